"""The layout options' defaults build the parameter trees dpvl always built, so checkpoints of
the demo configs (and of DP-CLIP's paper config, whose encoder keeps the defaults) still load."""

import hashlib

import jax
import numpy as np
import pytest

from configs import dpcap_tiny
from configs import dpclip_laion233m
from configs import dpclip_tiny
from configs import vip_tiny
from dpvl.objectives import build_objective

# config -> (leaves, parameters, sha256 of the "path shape" lines), recorded before the options.
TREES = {
    vip_tiny: (59, 111_152, "989355c4d56bdcb0"),
    dpcap_tiny: (74, 218_880, "f48f497f013c288c"),
    dpclip_tiny: (74, 50_560, "184763067a01ed51"),
    dpclip_laion233m: (358, 139_770_624, "5b22f9d7d87e5814"),
}


@pytest.mark.parametrize("config", TREES, ids=lambda c: c.__name__.split(".")[-1])
def test_default_layouts_build_the_same_parameter_trees(config, bert_sized_vocab):
  c = config.get_config()
  if c.get("tokenizer") and c.tokenizer.type == "wordpiece":
    c.tokenizer.vocab_file = bert_sized_vocab
  shapes = jax.eval_shape(build_objective(c).init, jax.random.key(0))
  lines = sorted(f"{jax.tree_util.keystr(p)} {tuple(x.shape)}"
                 for p, x in jax.tree_util.tree_leaves_with_path(shapes))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]
  assert (len(lines), count, digest) == TREES[config], "\n".join(lines)
