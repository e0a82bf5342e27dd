"""Recall@k of image-text retrieval."""

import numpy as np
import pytest

from dpvl.evaluate import retrieval


def test_recall_at_k_counts_ranks_in_both_directions():
  sims = np.array([[0.9, 0.1, 0.0], [0.95, 0.5, 0.2], [0.0, 0.1, 0.3]])
  got = retrieval.recall_at_k(sims, (1, 2))
  assert got["image_to_text_recall@1"] == pytest.approx(2 / 3)  # image 1 ranks caption 0 first
  assert got["text_to_image_recall@1"] == pytest.approx(2 / 3)  # caption 0 prefers image 1
  assert got["image_to_text_recall@2"] == 1.0 and got["text_to_image_recall@2"] == 1.0
