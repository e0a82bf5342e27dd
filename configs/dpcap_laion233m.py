"""DP-Cap paper recipe (Sander et al., 2024): ViT-B/16 captioner, DP-SGD on 233M LAION pairs.

  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account
  python -m dpvl.main --config=configs/dpcap_laion233m.py --mode=account \\
      --config.privacy.noise_multiplier=0.728      # the paper's sigma

The paper's run on N = 233,804,767 pairs: expected batch 1,310,720, C = 1, 5,708 steps, target
epsilon 8 at delta = 1/N; AdamW (0.9, 0.95), weight decay 0.005 on all parameters, lr 5.12e-4,
2,000 warm-up steps, then a cosine over a 10,000-step horizon stopped at step 5,708 (the
learning rate ends at 0.56 of its peak, not 0); captions of 40 BERT-uncased word pieces
(`config.tokenizer.vocab_file`: bert-base-uncased's public vocab.txt). The paper starts from a
synthetic (non-private) warm start.
"""

import ml_collections

from configs import common
from configs import evals
from configs import laion


def get_config():
  c = common.run("dpcap", steps=5_708)
  c.data = laion.laion233m_data(papers_augmentation=True)
  c.tokenizer = common.bert_tokenizer(max_len=40)

  # DP-Cap's model (`mae_vit_base_patch16_autoregressive_nobias`): ViT-B/16 without qkv biases
  # and with a frozen class token; a linear bridge with bias, fixed 2-D sin-cos positions added
  # to the memory (zero on the class token); a post-LN decoder without biases, fixed 1-D
  # sin-cos text positions, unit-normal token embeddings and a LayerNorm + linear head with
  # bias; xavier-uniform dense kernels and exact GELU throughout.
  c.model = ml_collections.ConfigDict(dict(
      dtype="bfloat16",
      encoder=laion.vit_b16(qkv_bias=False, cls_token="frozen", **laion.TIMM_INIT),
      bridge_bias=True, memory_posemb="sincos2d",
      decoder=dict(width=768, depth=6, num_heads=12, mlp_dim=3072, layout="post_ln",
                   posemb="sincos1d", embed_init="unit_normal", **laion.TIMM_INIT)))

  c.batch = common.batch(expected_size=1_310_720,
                         microbatch_size=16_384)  # 128 per device on 128 devices
  c.mesh = common.mesh()
  c.privacy = common.privacy()
  c.optimizer = common.optimizer(learning_rate=5.12e-4, warmup_steps=2_000,
                                 schedule_steps=10_000, decay="all")

  # The paper's evaluations on ImageNet-1k, prepared by TFDS (never downloaded; give its
  # directory: --config.evals.<name>.data.data_dir, and .test_data.data_dir for the probe and
  # few-shot): the linear probe and few-shot accuracy on the last layer's mean-pooled tokens,
  # and greedy captions of 16 validation images every 500 steps. The captioner's zero-shot
  # accuracy needs the 1,000 class names and ARO needs its files: add
  # evals.imagenet_caption_zero_shot(names) and evals.caption_order(path) (docs/vip_and_evals.md).
  c.evals = ml_collections.ConfigDict(dict(
      imagenet_probe=evals.imagenet_linear_probe(blocks=0),
      imagenet_few_shot=evals.imagenet_few_shot(blocks=0),
      imagenet_captions=evals.imagenet_caption_samples()))
  return c
