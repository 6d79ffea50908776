"""The ``fsq-api`` directive: an API reference generated from a package's ``__all__``.

``.. fsq-api:: fsq`` documents every public name of ``fsq`` with autodoc, then gives
each public submodule named in ``fsq.__all__`` (``fsq.delays``, ``fsq.parallel``, ...)
a section of its own with its public names. A name added to ``__all__`` therefore
appears in the reference without editing any page.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles


def public_names(module: types.ModuleType) -> list[str]:
    """``module.__all__`` if it has one, else the names its source defines at top level.

    Reading the source rather than ``vars(module)`` leaves out what the module imports
    (``jax``, ``NamedTuple``, ...), which is not its API.
    """
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = []
    for node in ast.parse(inspect.getsource(module)).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [name for name in names if not name.startswith("_")]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


def _document(module: str, name: str, obj: Any) -> list[str]:
    """reStructuredText that documents ``obj``, importable as ``module.name``."""
    path = f"{module}.{name}"
    if inspect.isclass(obj):
        # A NamedTuple's fields are documented by its "Attributes:" section; listing them
        # as members too would describe each one twice.
        options = [] if _is_namedtuple(obj) else ["   :members:", "   :show-inheritance:"]
        return [f".. autoclass:: {path}", *options, ""]
    if callable(obj):
        return [f".. autofunction:: {path}", ""]
    return [f".. py:data:: {name}", f"   :module: {module}", f"   :value: {obj!r}", ""]


def module_reference(name: str, title: bool) -> list[str]:
    """The reference of module ``name`` (a dotted path, possibly an alias such as
    ``fsq.staleness``), followed by the sections of its public submodules."""
    module = _import(name)
    lines = [name, "-" * len(name), ""] if title else []
    lines += [f".. automodule:: {name}", ""]
    submodules = []
    for member in public_names(module):
        obj = getattr(module, member)
        if inspect.ismodule(obj):
            submodules.append(f"{name}.{member}")
        else:
            lines += _document(name, member, obj)
    for submodule in submodules:
        lines += module_reference(submodule, title=True)
    return lines


def _import(name: str) -> types.ModuleType:
    """Imports ``a.b.c``, also when ``c`` is only an attribute of ``a.b`` (an alias)."""
    parent, _, attribute = name.rpartition(".")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return getattr(_import(parent), attribute)


class FsqApi(SphinxDirective):
    """``.. fsq-api:: package``: the whole public API of ``package``."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        content = StringList()
        for line in module_reference(self.arguments[0], title=False):
            content.append(line, "<fsq-api>")
        # Parsed with titles, so that each submodule becomes a section of the page.
        root = nodes.section()
        root.document = self.state.document
        nested_parse_with_titles(self.state, content, root)
        return root.children


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("fsq-api", FsqApi)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
