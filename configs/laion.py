"""What the paper-scale configs share: the LAION-233M data, the ViT-B/16 encoder and the
papers' initialization."""

import ml_collections

N = 233_804_767  # the LAION-2B-en subset of DP-Cap and ViP (Sander et al., 2024)


def laion233m_data(papers_augmentation: bool = False) -> ml_collections.ConfigDict:
  """The LAION subset converted by `python -m dpvl.data.convert` (img2dataset tar shards ->
  ArrayRecord); data.size must equal num_records of its index.json. See docs/data.md.

  `papers_augmentation`: ViP's and DP-Cap's input pipeline, RandomResizedCrop(224, scale
  0.2-1, bicubic) + horizontal flip drawn afresh at every step, ImageNet mean/std
  normalisation; otherwise a centre crop to [-1, 1].
  """
  return ml_collections.ConfigDict(dict(
      source="array_record", path="gs://YOUR_BUCKET/laion233m-arrayrecord", size=N,
      image_size=224, seed=0,
      crop="random_resized" if papers_augmentation else "center", crop_scale=(0.2, 1.0),
      flip=papers_augmentation,
      normalization="imagenet" if papers_augmentation else "half",
      max_skip_fraction=0.05,  # stop when far more records than this are unusable
      workers=16))  # decoding processes per host


# MAE's, timm's and DP-Cap's initialization and activation: xavier-uniform dense kernels (the
# patch embedding's too), exact (erf) GELU. Flax's defaults are LeCun-normal and tanh GELU.
TIMM_INIT = dict(dense_init="xavier_uniform", gelu="exact")


def vit_b16(qkv_bias: bool, **layout) -> dict:
  """ViT-B/16 with fixed 2-D sin-cos position embeddings, no head; `layout` adds ViT options
  (cls_token, dense_init, gelu; by default no class token and Flax's init)."""
  return dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
              qkv_bias=qkv_bias, posemb="sincos2d", **layout)
