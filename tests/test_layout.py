"""The shape of the package: rules a newcomer can rely on."""

import importlib
import inspect
import os
import pkgutil

import pytest

import pymta
from pymta.status import PymtaError

pytestmark = pytest.mark.unit   # pure units: make test-fast runs them

# Exceptions that are not PymtaErrors on purpose, and why.
OUTSIDE_THE_TREE = {
    # An OSError: raised where os calls are, caught with the OS errors beside it.
    "pymta.safefile.Refused",
}


def _modules():
    for info in pkgutil.iter_modules(pymta.__path__):
        yield importlib.import_module(f"pymta.{info.name}")


def test_every_exception_of_pymta_is_in_the_pymtaerror_tree():
    outside = []
    for mod in _modules():
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == mod.__name__ and not issubclass(obj, PymtaError)):
                outside.append(f"{mod.__name__}.{name}")
    assert sorted(outside) == sorted(OUTSIDE_THE_TREE)


def test_every_module_of_the_package_imports():
    # With the dependencies installed, each module imports as it is (an
    # optional dependency is imported where it is used, not at the top).
    names = [m.__name__ for m in _modules()]
    assert "pymta.status" in names and len(names) == len(
        [f for f in os.listdir(os.path.dirname(pymta.__file__)) if f.endswith(".py")
         and f != "__init__.py"])
