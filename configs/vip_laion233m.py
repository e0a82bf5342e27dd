"""ViP paper recipe (Yu et al., 2023): ViT-B/16 MAE, DP-SGD on 233M LAION images.

  python -m dpvl.main --config=configs/vip_laion233m.py --mode=account \\
      --config.privacy.noise_multiplier=0.48       # the paper's sigma: RDP epsilon 8.0
  python -m dpvl.main --config=configs/vip_laion233m.py:official --mode=account

The paper's run: expected batch 98,304, sigma 0.48 (or calibrated to target epsilon 8), C = 0.1,
6,000 steps, delta = 1/(2N); AdamW (0.9, 0.95), weight decay 0.005 on all parameters, lr =
blr * B / 256 with blr = 1.5e-5 (the official PRETRAIN.md; MAE's 1.5e-4 is ten times more),
lr = min((t + 1) / 1,000, cosine over the whole horizon); pixel loss without norm_pix_loss;
decoder 512 wide, 4 blocks, 16 heads; mask ratio 0.75. `:official` is the official command's
run instead: batch 81,920, sigma 0.5, 10,000 steps (RDP epsilon 6.99 at N = 233.8M). Start
from a stage-1 synthetic run (`config.init_from`).
"""

import ml_collections

from configs import common
from configs import evals
from configs import laion

# (expected batch, sigma, steps) of the paper's run and of the official command's.
RUNS = {"": (98_304, None, 6_000), "official": (81_920, 0.5, 10_000)}


def get_config(run: str = ""):
  """The paper's run, or `run="official"` (`--config=configs/vip_laion233m.py:official`)."""
  batch, sigma, steps = RUNS[run or ""]
  c = common.run("vip_mae", steps=steps)
  # LAION converted to ArrayRecord (`python -m dpvl.data.convert`; docs/data.md): the images
  # are read, the captions are not used by ViP.
  c.data = laion.laion233m_data(papers_augmentation=True)

  # ViP's model (MAE's layout, `mae_vit_base_dec512d4b`): a learnt class token carried through
  # the decoder; xavier-uniform dense kernels and exact GELU in both.
  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16", mask_ratio=0.75, norm_pix_loss=False,
      encoder=laion.vit_b16(qkv_bias=True, cls_token="learn", **laion.TIMM_INIT),
      decoder=dict(width=512, depth=4, num_heads=16, mlp_dim=2048, **laion.TIMM_INIT)))

  c.batch = common.batch(expected_size=batch, microbatch_size=4_096)
  c.mesh = common.mesh()
  c.privacy = common.privacy(
      clip_norm=0.1, delta=1 / (2 * laion.N),
      accountant="rdp")  # the paper's accountant; PLD gives 6.83 at sigma 0.48
  if sigma is not None:
    c.privacy.noise_multiplier = sigma
  c.optimizer = common.optimizer(learning_rate=1.5e-5 * batch / 256, warmup_steps=1_000,
                                 schedule="warmup_min_cosine", decay="all")

  # The paper's evaluations on ImageNet-1k, prepared by TFDS (never downloaded; give its
  # directory: --config.evals.<name>.data.data_dir and .test_data.data_dir, or manual_dir for
  # the archives): the linear probe on the last 12 blocks, mean-pooled (MAE's LARS protocol),
  # and few-shot accuracy. Both run before the first step and after the last.
  c.evals = ml_collections.ConfigDict(dict(
      imagenet_probe=evals.imagenet_linear_probe(blocks=12),
      imagenet_few_shot=evals.imagenet_few_shot(blocks=12)))
  return c
