"""The examples in public docstrings run and print what they claim."""

import doctest
import importlib
import pkgutil

import pytest

import fsq

MODULES = sorted(m.name for m in pkgutil.walk_packages(fsq.__path__, prefix="fsq.") if not m.ispkg)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
