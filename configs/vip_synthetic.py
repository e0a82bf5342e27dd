"""ViP stage 1: non-private MAE on procedural synthetic images (no privacy cost).

  python -m dpvl.main --config=configs/vip_synthetic.py --workdir=runs/vip_stage1
  python -m dpvl.main --config=configs/vip_tiny.py --workdir=runs/vip_stage2 \\
      --config.init_from=runs/vip_stage1
"""

from configs import vip_tiny


def get_config():
  """Stage 2's config (`vip_tiny`: the same model) on procedural images, without DP."""
  c = vip_tiny.get_config()
  c.steps = 200
  c.data.source = "procedural"
  c.data.size = 50_000
  c.data.seed = 21
  c.batch.expected_size = 256
  c.batch.microbatch_size = 64
  c.privacy.enabled = False
  c.privacy.target_epsilon = None
  return c
