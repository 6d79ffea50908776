"""The documentation builds without warnings and its API reference covers the public API."""

import importlib
import inspect
import io
import pathlib
import re
import types

import pytest

import fsq

DOCS = pathlib.Path(__file__).parents[1] / "docs"

# Sphinx's own napoleon extension calls an interface that Sphinx deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")


def public_members(module: types.ModuleType) -> list[str]:
    """``__all__``, or else the functions and classes the module itself defines."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
    ]


def public_api() -> list[str]:
    """Every name of ``fsq.__all__``, and the public members of the submodules it names."""
    names = []
    for name in fsq.__all__:
        names.append(f"fsq.{name}")
        value = getattr(fsq, name)
        if inspect.ismodule(value):
            names += [f"fsq.{name}.{member}" for member in public_members(value)]
    return names


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    """Sphinx's environment after reading the whole site, and the warnings it printed."""
    application = pytest.importorskip(
        "sphinx.application", reason="sphinx is not installed: pip install -e '.[docs]'"
    )
    out = tmp_path_factory.mktemp("docs")
    warnings = io.StringIO()
    # The "dummy" builder reads and resolves every page (autodoc included), writes nothing.
    app = application.Sphinx(
        DOCS,
        DOCS,
        out / "dummy",
        out / "doctrees",
        "dummy",
        status=None,
        warning=warnings,
        freshenv=True,
    )
    app.build()
    return app.env, re.sub(r"\x1b\[[0-9;]*m", "", warnings.getvalue())  # no colour codes


def test_docs_build_without_warnings(built_docs):
    _, warnings = built_docs
    assert not warnings, warnings


def test_formulas_render_without_a_network(built_docs):
    env, _ = built_docs
    # MathJax is served from the site's own _static folder, not a CDN.
    assert env.config.mathjax_path == "mathjax/tex-chtml.js"
    bundled = pathlib.Path(importlib.import_module("sphinx-mathjax-offline").__file__).parent
    assert (bundled / "static" / "mathjax" / "tex-chtml.js").stat().st_size > 100_000


def test_api_reference_documents_every_public_name(built_docs):
    env, _ = built_docs
    documented = {
        name for name, entry in env.get_domain("py").objects.items() if entry.docname == "api"
    }
    missing = [name for name in public_api() if name not in documented]
    assert not missing, f"missing from docs/api.rst: {missing}"
    # Guard against a vacuous pass: the catalogue, a delay model, a staleness rule.
    assert {"fsq.adam", "fsq.delays.uniform", "fsq.staleness.weighted_step"} <= documented


@pytest.mark.parametrize(
    "page",
    [
        "concepts.md",
        "assemble.md",
        "time.md",
        "checkpointing.md",
        "flax.md",
        "algorithms/local_sgd.md",
        "algorithms/diloco.md",
        "algorithms/streaming_diloco.md",
        "algorithms/async_local_sgd.md",
        "algorithms/implicit_momentum.md",
    ],
)
def test_the_code_of_a_page_runs(page):
    """The pages that show assemblies run their code blocks, in order, as written."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS / page), "exec"), namespace)


@pytest.mark.parametrize(
    "name", ["aggregation", "compensation", "compression", "delays", "faults", "staleness"]
)
def test_the_modules_the_docstrings_name_import(name):
    """``import fsq.faults`` works as the docstrings' ``:mod:`fsq.faults``` promises."""
    import importlib

    module = importlib.import_module(f"fsq.{name}")
    assert module is getattr(fsq, name) and module.__doc__


def test_user_docs_name_studies_not_issues():
    """Readers have no issue tracker: the pages name studies, not "issue 4"."""
    pages = [*DOCS.rglob("*.md"), DOCS.parent / "README.md"]
    pages = [p for p in pages if "_build" not in p.parts]
    found = [
        (p.name, m.group(0))
        for p in pages
        for m in re.finditer(r"\bissues? ?#?\d+", p.read_text(), flags=re.IGNORECASE)
    ]
    assert len(pages) > 20 and not found, found


WORKING_NOTES = (
    r"\bthe issue\b",
    r"\bissue's\b",
    r"\bacceptance\b",
    r"\bitem \d",
    r"\bprevious version\b",
    r"\bmisled once\b",
    r"\bthe goal was\b",
    r"\bwe set ourselves\b",
    r"\bthis session\b",
    r"\bsession's machine\b",
    r"\bon this (?:\d-core )?machine\b(?!'s)",
)


def test_user_docs_hold_results_not_working_notes():
    """No page refers to the work behind it (an issue, its acceptance, the development
    machine, an earlier version): results are stated with their protocol. Line breaks
    count as spaces, so a phrase cut by one is found too."""
    pages = [*DOCS.rglob("*.md"), DOCS.parent / "README.md"]
    pages = [p for p in pages if "_build" not in p.parts]
    found = [
        (p.name, m.group(0))
        for p in pages
        for pattern in WORKING_NOTES
        for m in re.finditer(pattern, " ".join(p.read_text().split()), flags=re.IGNORECASE)
    ]
    assert len(pages) > 20 and not found, found
