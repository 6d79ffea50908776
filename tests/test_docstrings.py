"""The examples in the docstrings of every public module run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import fsq

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(fsq.__path__, prefix="fsq.")
    if not m.ispkg and not m.name.rsplit(".", 1)[1].startswith("_")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
