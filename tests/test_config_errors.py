"""Every bad config value or config-named path fails with a ConfigError naming it, at once."""

import json
import os
import subprocess
import sys
import types

from conftest import small_dpcap_config
from conftest import small_dpclip_config
import ml_collections
import pytest
import webdata_fixtures as wf

from configs import vip_tiny
from dpvl import config as config_lib
from dpvl import objectives
from dpvl.data import arrayrecord
from dpvl.data import procedural_images
from dpvl.data import shape_scenes
from dpvl.data import sources
from dpvl.data import tokenizers
from dpvl.data import webdataset

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _raises(match):
  return pytest.raises(config_lib.ConfigError, match=match)


def _data(**fields):
  return ml_collections.ConfigDict(fields)


# -- data sources ---------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, match", [
    (dict(source="array_record", image_size=16), r"data.path is required.*array_record"),
    (dict(source="webdataset", path="", image_size=16), r"data.path is required.*webdataset"),
    (dict(source="tfds", image_size=16), r"data.name is required.*tfds"),
    (dict(source="shape_scenes", image_size=16, seed=0), r"data.size is required"),
    (dict(source="procedural", size=5, seed=0), r"data.image_size is required"),
    (dict(source="shape_scenes", size=0, image_size=16, seed=0), r"num_records \(data.size\)"),
    (dict(source="procedural", size=5, image_size=0, seed=0), r"\(data.image_size\)"),
    (dict(source="shape_scenes", size=5, image_size=16, seed=-1), r"\(data.seed\) must be non-"),
    (dict(source="shape_scenes", size=5, image_size=16, seed=0, max_objects=0),
     r"max_objects \(data.max_objects\) must be in \[1, 9\]"),
])
def test_data_fields(cfg, match):
  with _raises(match):
    sources.build_source(_data(**cfg))


def test_generated_sources_check_their_arguments():
  with _raises("num_records"):
    procedural_images.ProceduralImages(num_records=0, image_size=8, seed=0)
  with _raises("max_objects"):
    shape_scenes.ShapeScenes(5, 8, seed=0, max_objects=10)


def test_array_record_directory(tmp_path):
  cfg = _data(source="array_record", path=str(tmp_path), image_size=16)
  with _raises(r"data.path=.* has no index.json; .*dpvl.data.convert"):
    sources.build_source(cfg)
  index = tmp_path / "index.json"
  index.write_text("{not json")
  with _raises(f"{index} is not valid JSON"):
    sources.build_source(cfg)
  index.write_text(json.dumps(dict(num_records=3)))
  with _raises(f"{index} is not an index as .*dpvl.data.convert"):
    sources.build_source(cfg)
  index.write_text(json.dumps(dict(num_records=0, rejected={"corrupt_image": 2},
                                   shards=[dict(file="shard-00000.array_record", records=0)])))
  with _raises(r"holds no record \(rejected: \{'corrupt_image': 2\}\)"):
    sources.build_source(cfg)
  with _raises("data.crop must be one of"):
    arrayrecord.ArrayRecordSource(str(tmp_path), 16, crop="zoom")


def test_webdataset_shards(tmp_path):
  with _raises("names no tar shard"):
    webdataset.WebDatasetSource(str(tmp_path / "*.tar"), 16)
  with _raises("data.crop must be one of"):
    webdataset.WebDatasetSource(str(tmp_path / "a.tar"), 16, crop="zoom")
  with _raises(r"no complete record \(1 shards listed, 1 missing"):
    webdataset.WebDatasetSource(str(tmp_path / "a.tar"), 16)
  wf.write_shard(tmp_path / "00.tar", 0, 2)
  with _raises(r"names a directory, .*; name its tar shards"):
    sources.build_source(_data(source="webdataset", path=str(tmp_path), image_size=16))
  assert len(webdataset.WebDatasetSource(str(tmp_path / "*.tar"), 16)) == 2


class _FakeTfds:
  """The slice of tensorflow_datasets that TfdsSource uses: "cifar10", split "test" only."""

  class download:  # pylint: disable=invalid-name
    DownloadConfig = dict

  def __init__(self, prepared=True):
    self.prepared = prepared

  def builder(self, name, data_dir, file_format):
    del data_dir, file_format
    if name != "cifar10":
      raise ValueError(f"Dataset {name} not found.\nAvailable:\n\t- cifar10")
    prepared = self.prepared

    class Builder:

      def is_prepared(self):
        return prepared

      def as_data_source(self, split):
        raise ValueError(f"Unknown split {split!r}. Should be one of ['test'].")

    return Builder()


def test_tfds_source(monkeypatch):
  cfg = _data(source="tfds", name="cifar11", split="tset", image_size=16, data_dir="/d")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with _raises("pip install tensorflow-datasets"):
    sources.build_source(cfg)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds())
  with _raises(r"^data.name='cifar11': Dataset cifar11 not found.$"):  # the first line only
    sources.build_source(cfg)
  cfg.name = "cifar10"
  with _raises(r"data.split='tset' of TFDS dataset 'cifar10' cannot be read: Unknown split"):
    sources.build_source(cfg)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", _FakeTfds(prepared=False))
  with _raises(r"not prepared in data_dir='/d'.*data.manual_dir"):
    sources.build_source(cfg)


# -- tokenizers -----------------------------------------------------------------------------


def _tokenizer(type_, vocab_file="", max_len=8):
  return tokenizers.build_tokenizer(types.SimpleNamespace(type=type_, vocab_file=vocab_file,
                                                          max_len=max_len))


def test_tokenizer_fields(tmp_path, monkeypatch):
  with _raises("tokenizer.max_len must be an integer >= 2, got 1"):
    _tokenizer("byte", max_len=1)
  with _raises("tokenizer.vocab_file='' is not a readable file"):
    _tokenizer("wordpiece")
  (tmp_path / "latin1.txt").write_bytes(b"[PAD]\n\xff\xfe\n")
  with _raises("tokenizer.vocab_file=.*latin1.txt' cannot be read"):
    _tokenizer("wordpiece", str(tmp_path / "latin1.txt"))
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\na\n")
  with _raises(r"lacks \['\[CLS\]', '\[SEP\]'\]"):
    _tokenizer("wordpiece", str(tmp_path / "vocab.txt"))
  with _raises("tokenizer.vocab_file=.*/none.model' is not a readable file"):
    _tokenizer("sentencepiece", str(tmp_path / "none.model"))
  (tmp_path / "bad.model").write_bytes(b"nonsense")
  with _raises("is not a sentencepiece model"):
    _tokenizer("sentencepiece", str(tmp_path / "bad.model"))
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
  with _raises("pip install sentencepiece"):
    _tokenizer("sentencepiece", str(tmp_path / "bad.model"))


def test_sentencepiece_model_without_bos_or_eos(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  scenes = shape_scenes.ShapeScenes(200, 8, seed=0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([scenes[i]["caption"] for i in range(200)]),
      model_prefix=str(tmp_path / "no_eos"), vocab_size=30, model_type="unigram", bos_id=-1,
      eos_id=-1, minloglevel=2)
  with _raises("has no BOS or EOS piece"):
    _tokenizer("sentencepiece", str(tmp_path / "no_eos.model"))


# -- objectives: every model field a module would reject at init ----------------------------


def _small_vip_config():
  c = vip_tiny.get_config()
  c.data.image_size = 16
  c.model.encoder.update(dict(patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.decoder.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64))
  return c


_CONFIGS = dict(dpcap=small_dpcap_config, dpclip=small_dpclip_config, vip_mae=_small_vip_config)


@pytest.mark.parametrize("objective", sorted(_CONFIGS))
def test_the_small_configs_build(objective):
  assert objectives.build_objective(_CONFIGS[objective]()).name == objective


@pytest.mark.parametrize("objective, field, value, match", [
    ("dpcap", "data.image_size", 20,
     r"config.data.image_size=20 is not a multiple of config.model.encoder.patch_size=8"),
    ("dpcap", "model.encoder.patch_size", 0, "patch_size must be a positive integer, got 0"),
    ("dpcap", "model.encoder.num_heads", 3,
     r"config.model.encoder.width=32 is not divisible by config.model.encoder.num_heads=3"),
    ("dpcap", "model.encoder.num_heads", 0, "num_heads must be a positive integer, got 0"),
    ("dpcap", "model.encoder.posemb", "rope", r"posemb='rope' is unknown"),
    ("dpcap", "model.encoder.width", 30, r"encoder.width=30 must be divisible by 4"),
    ("dpcap", "model.encoder.nm_heads", 2, "has no field 'nm_heads'; did you mean 'num_heads'"),
    ("dpcap", "model.decoder.num_heads", 5, r"config.model.decoder.width=32 is not divisible"),
    ("dpcap", "model.decoder.max_len", 8, r"decoder.max_len cannot be set"),
    ("dpcap", "model.dtype", "flaot32", r"config.model.dtype='flaot32' is not a dtype"),
    ("dpclip", "model.temperature", 0.0, "config.model.temperature must be positive, got 0.0"),
    ("dpclip", "model.text.num_heads", 3, r"config.model.text.width=32 is not divisible"),
    ("dpclip", "model.embed_dim", 0, "config.model.embed_dim must be a positive integer"),
    ("vip_mae", "model.mask_ratio", 1.0, r"config.model.mask_ratio must be in \[0, 1\), got 1.0"),
    ("vip_mae", "model.decoder.width", 30, r"decoder.width=30 must be divisible by 4"),
    ("vip_mae", "model.decoder.heads", 2, "decoder has no field 'heads'"),
])
def test_model_fields_fail_at_build_not_at_init(objective, field, value, match):
  config = _CONFIGS[objective]()
  *parents, name = field.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  with section.ignore_type():
    section[name] = value
  with _raises(match):
    objectives.build_objective(config)


def test_a_missing_model_field_is_named():
  config = small_dpcap_config()
  del config.model.encoder["mlp_dim"]
  with _raises("config.model.encoder.mlp_dim is missing"):
    objectives.build_objective(config)


# -- the command line: one line, exit status 2, before any compute --------------------------


def _cli_error(tmp_path, config, *overrides):
  out = subprocess.run(
      [sys.executable, "-m", "dpvl.main", f"--config=configs/{config}",
       f"--workdir={tmp_path / 'run'}", *overrides],
      cwd=ROOT, capture_output=True, text=True, timeout=60,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
  assert not os.path.exists(tmp_path / "run")
  return lines[0]


def test_cli_num_heads_not_dividing_the_width(tmp_path):
  # A fixed noise multiplier: no calibration runs before the objective is built.
  line = _cli_error(tmp_path, "dpcap_tiny.py", "--config.model.encoder.num_heads=3",
                    "--config.privacy.noise_multiplier=1.0")
  assert "config.model.encoder.width=64 is not divisible by" in line, line


def test_cli_array_record_directory_without_index(tmp_path):
  (tmp_path / "data").mkdir()
  # dpcap_webdata_tiny: dpcap_tiny with the data.path field (a locked config adds none).
  line = _cli_error(tmp_path, "dpcap_webdata_tiny.py", "--config.data.source=array_record",
                    f"--config.data.path={tmp_path / 'data'}")
  assert "has no index.json" in line, line
