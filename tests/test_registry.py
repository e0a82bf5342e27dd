"""The name -> builder registry: lookup, lazy import, and the one error for an unknown name."""

import subprocess
import sys
import types

import pytest

from dpvl import config as config_lib
from dpvl import evaluate
from dpvl import objectives
from dpvl import registry
from dpvl.data import sources
from dpvl.data import tokenizers


def test_lookup_returns_the_builder_and_the_mapping_lists_the_names():
  double = lambda x: 2 * x
  r = registry.Registry("config.f", {"double": double, "root": "math:sqrt"})
  assert r["double"] is double and r.get("double") is double
  assert r["root"](16.0) == 4.0
  assert sorted(r) == ["double", "root"] and len(r) == 2
  assert "root" in r and "cube" not in r and [] not in r
  assert r.get("cube") is None and r.get("cube", double) is double


def test_lazy_entries_are_imported_on_first_lookup_only(monkeypatch):
  module = types.ModuleType("dpvl_test_lazy_builders")
  module.build = lambda: "built"
  imported = []
  r = registry.Registry("config.f", {"lazy": "dpvl_test_lazy_builders:build"})
  assert "lazy" in r and list(r) == ["lazy"]  # neither imports

  def import_module(name):
    imported.append(name)
    return module

  monkeypatch.setattr(registry.importlib, "import_module", import_module)
  assert r["lazy"]() == "built" and r["lazy"]() == "built"
  assert imported == ["dpvl_test_lazy_builders"]  # once
  assert "dpvl_test_lazy_builders" not in sys.modules


def test_objective_modules_are_imported_only_when_looked_up():
  code = ("import sys; from dpvl import objectives; "
          "assert not [m for m in sys.modules if m.startswith('dpvl.objectives.')]; "
          "objectives.REGISTRY['vip_mae']; "
          "assert [m for m in sys.modules if m.startswith('dpvl.objectives.')] == "
          "['dpvl.objectives.vip_mae']")
  subprocess.run([sys.executable, "-c", code], check=True)
  assert objectives.REGISTRY["dpcap"].__module__ == "dpvl.objectives.dpcap"


@pytest.mark.parametrize("lookup, message", [
    (lambda: registry.Registry("config.f", {"b": abs, "a": abs})["c"],
     "config.f='c' is unknown; choose one of ['a', 'b']."),
    (lambda: registry.Registry("config.f", {"a": abs}).lookup(None, field="config.g"),
     "config.g=None is unknown; choose one of ['a']."),
    (lambda: objectives.build_objective(types.SimpleNamespace(objective="dpcapp")),
     "config.objective='dpcapp' is unknown; choose one of ['dpcap', 'dpclip', 'vip_mae']."),
    (lambda: sources.build_source(types.SimpleNamespace(source="laion")),
     "data.source='laion' is unknown; choose one of ['array_record', 'procedural', "
     "'shape_scenes', 'tfds', 'webdataset']."),
    (lambda: tokenizers.build_tokenizer(types.SimpleNamespace(type="unigram")),
     "tokenizer.type='unigram' is unknown; choose one of ['byte', 'sentencepiece', "
     "'wordpiece']."),
    (lambda: evaluate.build_evaluators(dict(evals=dict(probe=dict(type="knn"))), None),
     "config.evals.probe.type='knn' is unknown; choose one of ['caption_order', "
     "'caption_samples', 'caption_zero_shot', 'few_shot', 'linear_probe', 'retrieval', "
     "'streamed_linear_probe', 'zero_shot']."),
])
def test_an_unknown_name_is_one_config_error_listing_the_choices(lookup, message):
  with pytest.raises(config_lib.ConfigError) as info:
    lookup()
  assert str(info.value) == message


def test_bad_entries_are_refused():
  with pytest.raises(ValueError, match="package.module:function"):
    registry.Registry("config.f", {"a": "math.sqrt"})
  with pytest.raises(TypeError, match="neither callable"):
    registry.Registry("config.f", {"a": 3})
