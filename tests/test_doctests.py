"""The examples in dpvl's docstrings run and print what they show (`doctest`).

Every module under dpvl/ is searched, so an example added anywhere is run here.
"""

import contextlib
import doctest
import importlib
import io
import pkgutil

import pytest

import dpvl

# Modules known to hold examples: the search must find at least these.
WITH_EXAMPLES = {"dpvl.config", "dpvl.registry", "dpvl.privacy.accounting",
                 "dpvl.privacy.sampling"}


@pytest.fixture(scope="module")
def results():
  """{module name: (failed, attempted, doctest's report)} of every dpvl module with examples."""
  out = {}
  for info in pkgutil.walk_packages(dpvl.__path__, prefix="dpvl."):
    module = importlib.import_module(info.name)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
      failed, attempted = doctest.testmod(module)
    if attempted:
      out[info.name] = (failed, attempted, report.getvalue())
  return out


def test_the_modules_with_examples_are_found(results):
  assert WITH_EXAMPLES <= set(results), sorted(results)


def test_every_example_passes(results):
  failures = {name: report for name, (failed, _, report) in results.items() if failed}
  assert not failures, "\n".join(failures.values())
