"""The DP-Cap demo on image-text files: webdataset tar shards or a converted ArrayRecord dir.

  python -m dpvl.data.convert --from='/data/pairs/{00000..00009}.tar' --to=/data/pairs-ar
  python -m dpvl.main --config=configs/dpcap_webdata_tiny.py --workdir=runs/webdata \\
      --config.data.path=/data/pairs-ar --config.data.size=N

N is `num_records` in the directory's index.json (the converter prints it); a run whose
config.data.size disagrees with the source stops before step 0. For tar shards directly, set
`--config.data.source=webdataset --config.data.path='/data/pairs/{00000..00009}.tar'`.
"""

from configs import dpcap_tiny


def get_config():
  """The demo (`dpcap_tiny`) with its data read from files; it only sets and adds fields."""
  c = dpcap_tiny.get_config()
  c.data.source = "array_record"  # or "webdataset"
  c.data.path = ""                # the converted directory (or the tar shards)
  c.data.crop = "random_resized"  # drawn afresh each step, seeded by (data.seed, record, step)
  c.data.workers = 2              # decoding processes beside the training step
  c.data.index_cache = ""         # webdataset only: where to keep the shards' indices
  return c
