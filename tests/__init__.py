"""Tests of dpvl, laid out as the code is.

tests/<package>/test_<module>.py tests dpvl/<package>/<module>.py (test_init.py: the package's
__init__.py), tests/test_<module>.py a top-level module; test_train.py also trains end to end,
test_configs.py checks configs/, test_doctests.py and test_lint.py run doctest and ruff.
Helpers are plain modules imported by their package path (`from tests.data import webdata`);
shared fixtures live in conftest.py files.
"""
