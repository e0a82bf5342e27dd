"""The config files: each builds, none removes another's fields, the paper configs plan."""

import ast
import importlib
import json
import pathlib

import ml_collections
import pytest

from dpvl.privacy import plan as plan_lib

CONFIG_DIR = pathlib.Path(__file__).parent.parent / "configs"
HELPERS = {"__init__", "common", "evals", "laion"}  # modules the configs build from
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in HELPERS)
# The paper's sigma and its epsilon by dp-accounting 0.6.0 (DP-Cap: Sander et al. 2024; ViP: Yu
# et al. 2024); None: no published sigma.
PAPER = {
    "dpcap_laion233m": (0.728, "epsilon_pld", 7.360),
    "vip_laion233m": (0.48, "epsilon_rdp", 7.996),
    "dpclip_laion233m": (1.0, None, None),
}


def _module(name):
  return importlib.import_module(f"configs.{name}")


def _keys(config, prefix=""):
  """The dotted names of all leaves of `config`."""
  keys = set()
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _keys(value, f"{prefix}{name}.")
    else:
      keys.add(prefix + name)
  return keys


def _imported_configs(name):
  """The config modules (not helpers) that configs/<name>.py imports."""
  tree = ast.parse((CONFIG_DIR / f"{name}.py").read_text())
  return {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
          and node.module == "configs" for alias in node.names} - HELPERS


def test_helper_modules_are_not_configs():
  assert {"dpcap_tiny", "dpcap_laion233m", "vip_laion233m", "dpclip_laion233m"} <= set(NAMES)
  for name in HELPERS - {"__init__"}:
    assert not hasattr(_module(name), "get_config"), name


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_with_typed_overridable_fields(name):
  config = _module(name).get_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert {"objective", "seed", "steps", "data", "model", "batch", "privacy",
          "optimizer"} <= set(config)
  # Typed references: `--config.privacy.noise_multiplier=0.7` parses even though it is None.
  for field, kind in (("noise_multiplier", float), ("delta", float), ("seed", int)):
    assert config.privacy.get_ref(field).get_type() is kind, field
  assert "sampling" not in config.privacy  # Poisson is the only sampler


@pytest.mark.parametrize("name", NAMES)
def test_a_config_built_from_another_only_sets_or_adds_fields(name):
  keys = _keys(_module(name).get_config())
  for parent in _imported_configs(name):
    assert not _keys(_module(parent).get_config()) - keys, f"{name} removes {parent}'s fields"
  if name in PAPER:  # the paper recipes stand alone: helpers only
    assert not _imported_configs(name)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_plan(name):
  sigma, epsilon_key, want = PAPER[name]
  config = _module(name).get_config()
  config.privacy.noise_multiplier = sigma  # skips calibration (seconds per config)
  if want is not None:  # the published accounting rows take N = 233M
    delta_times_n = config.privacy.delta * config.data.size if config.privacy.delta else None
    config.data.size = 233_000_000
    if delta_times_n is not None:
      config.privacy.delta = delta_times_n / config.data.size
  summary = plan_lib.build_plan(config).summary()
  assert summary["steps"] == config.steps
  assert summary["expected_batch_size"] == config.batch.expected_size
  if want is not None:
    assert summary[epsilon_key] == pytest.approx(want, abs=1e-3)
  assert 0 < summary["epsilon_planned"] <= config.privacy.target_epsilon


def test_vip_recipe():
  c = _module("vip_laion233m").get_config()
  assert c.optimizer.learning_rate == pytest.approx(1.5e-5 * 98_304 / 256)  # blr 1.5e-5
  assert c.optimizer.schedule == "warmup_min_cosine" and c.optimizer.warmup_steps == 1_000
  assert c.optimizer.decay == "all" and c.optimizer.weight_decay == 0.005
  assert c.model.norm_pix_loss is False and c.privacy.clip_norm == 0.1
  assert c.privacy.delta == pytest.approx(1 / (2 * c.data.size))
  assert c.data.size == 233_804_767


def test_vip_official_command_variant():
  c = _module("vip_laion233m").get_config("official")
  assert (c.batch.expected_size, c.privacy.noise_multiplier, c.steps) == (81_920, 0.5, 10_000)
  assert c.optimizer.learning_rate == pytest.approx(1.5e-5 * 81_920 / 256)
  summary = plan_lib.build_plan(c).summary()
  assert summary["epsilon_rdp"] == pytest.approx(6.99, abs=5e-3)  # at N = 233.8M


def test_dpcap_recipe():
  c = _module("dpcap_laion233m").get_config()
  assert c.steps == 5_708 and c.optimizer.schedule_steps == 10_000  # stopped early
  assert c.optimizer.decay == "all" and c.optimizer.warmup_steps == 2_000
  assert c.data.size == 233_804_767


# The published recipes, field by field (ViP: Yu et al. 2023 and its official PRETRAIN.md;
# DP-Cap: Sander et al. 2024 and its official code), as `--mode=config` resolves them.
PAPERS_AUGMENTATION = {"data.crop": "random_resized", "data.crop_scale": [0.2, 1.0],
                       "data.flip": True, "data.normalization": "imagenet",
                       "data.size": 233_804_767, "data.image_size": 224}
TIMM_LAYOUT = {"dense_init": "xavier_uniform", "gelu": "exact"}
IMAGENET_EVALS = {  # MAE's linear-probe protocol and DP-Cap's few-shot shots, on ImageNet-1k
    "evals.imagenet_probe.type": "streamed_linear_probe",
    "evals.imagenet_probe.optimizer": "lars", "evals.imagenet_probe.epochs": 90,
    "evals.imagenet_probe.batch_size": 16_384, "evals.imagenet_probe.data.split": "train",
    "evals.imagenet_probe.test_data.split": "validation",
    "evals.imagenet_probe.data.name": "imagenet2012",
    "evals.imagenet_few_shot.shots": [1, 2, 5, 10]}
PUBLISHED = {
    "vip_laion233m": {
        **PAPERS_AUGMENTATION, **IMAGENET_EVALS, "evals.imagenet_probe.blocks": 12,
        "steps": 6_000, "batch.expected_size": 98_304,
        "privacy.clip_norm": 0.1, "privacy.delta": 1 / (2 * 233_804_767),
        "optimizer.learning_rate": 1.5e-5 * 98_304 / 256, "optimizer.warmup_steps": 1_000,
        "optimizer.schedule": "warmup_min_cosine", "optimizer.decay": "all",
        "optimizer.weight_decay": 0.005, "model.norm_pix_loss": False,
        "model.mask_ratio": 0.75, "model.encoder.cls_token": "learn",
        **{f"model.encoder.{k}": v for k, v in TIMM_LAYOUT.items()},
        **{f"model.decoder.{k}": v for k, v in TIMM_LAYOUT.items()},
        "model.decoder.width": 512, "model.decoder.depth": 4, "model.decoder.num_heads": 16},
    "dpcap_laion233m": {
        **PAPERS_AUGMENTATION, **IMAGENET_EVALS,
        "evals.imagenet_captions.type": "caption_samples",
        "steps": 5_708, "batch.expected_size": 1_310_720,
        "privacy.clip_norm": 1.0, "privacy.target_epsilon": 8.0,
        "optimizer.learning_rate": 5.12e-4, "optimizer.warmup_steps": 2_000,
        "optimizer.schedule_steps": 10_000, "optimizer.decay": "all",
        "optimizer.weight_decay": 0.005, "model.encoder.cls_token": "frozen",
        "model.encoder.qkv_bias": False, "model.bridge_bias": True,
        "model.memory_posemb": "sincos2d", "model.decoder.layout": "post_ln",
        "model.decoder.posemb": "sincos1d", "model.decoder.depth": 6,
        "tokenizer.type": "wordpiece", "tokenizer.max_len": 40,
        **{f"model.encoder.{k}": v for k, v in TIMM_LAYOUT.items()},
        **{f"model.decoder.{k}": v for k, v in TIMM_LAYOUT.items()}},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_the_resolved_paper_configs_hold_the_published_recipes(name, cli):
  out = cli(f"--config=configs/{name}.py", "--mode=config", env=dict(JAX_PLATFORMS="tpu"))
  assert out.returncode == 0, out.stderr
  resolved = json.loads(out.stdout)
  for dotted, want in PUBLISHED[name].items():
    value = resolved
    for key in dotted.split("."):
      value = value[key]
    assert value == (pytest.approx(want) if isinstance(want, float) else want), dotted
  assert resolved["tan"] == {"batch_size": 0}  # a real run unless asked
