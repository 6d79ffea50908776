"""The examples in the docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import fsq

MODULES = sorted(m.name for m in pkgutil.walk_packages(fsq.__path__, prefix="fsq.") if not m.ispkg)


def is_private(name: str) -> bool:
    return name.rsplit(".", 1)[1].startswith("_")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    """Every public module has an example; private ones run theirs (some define public
    functions that fsq.parallel exports)."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 or is_private(name), f"{name} has no example"
    assert result.failed == 0
