"""Converts webdataset tar shards into an ArrayRecord dataset with an index.

  python -m dpvl.data.convert --from='/data/laion/{00000..23299}.tar' --to=/data/laion-ar \\
      [--workers=16]

Each input shard becomes one ArrayRecord shard, converted in parallel (processes). Every record
is checked as training would read it (image decodes, caption is clean UTF-8 text); a bad one is
left out and counted by reason. Resumable: a shard is done when its marker
(`shard-XXXXX.json`, written after its ArrayRecord file is complete) exists; a rerun skips it.
At the end `index.json` gives N (the records written), the shards, and the rejected counts;
the command prints them. On a terminal a progress bar counts the shards done, with their rate
and an ETA (`dpvl.progress`).
"""

import argparse
import collections
import concurrent.futures
import json
import multiprocessing
import sys

from array_record.python import array_record_module
from etils import epath

from dpvl import jsonfile
from dpvl import progress
from dpvl.data import arrayrecord
from dpvl.data import errors
from dpvl.data import records
from dpvl.data import webdataset

_CHECK_SIZE = 32  # records are checked by decoding at (at least) this size


def convert_shard(url: str, out_dir: str, number: int) -> dict:
  """Converts one tar shard into `shard-{number}.array_record`; returns (and writes) its marker.

  Args:
    url: the tar shard's path or URL.
    out_dir: the output directory (or URL); it must exist.
    number: the shard's number, naming its files `shard-{number:05d}.*`.

  Returns:
    The marker: `source`, `file` (None if the shard is missing), `records` (written),
    `rejected` (counts by reason) and `missing` (the tar file was not found). If the marker
    exists already, it is read and returned and nothing is converted.
  """
  out = epath.Path(out_dir)
  name = f"shard-{number:05d}"
  marker = out / f"{name}.json"
  if marker.exists():
    return json.loads(marker.read_text())
  rejected = collections.Counter()
  written = 0
  try:
    index = webdataset.index_shard(url)
  except FileNotFoundError:
    result = dict(source=url, file=None, records=0, rejected={}, missing=True)
    jsonfile.write_atomic(marker, result)
    return result
  rejected.update(index.rejected)
  tmp = out / f"{name}.array_record.tmp"
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  try:
    with epath.Path(url).open("rb") as f:  # one open per shard: cheap on object stores too
      for key, where in index.keys:
        try:
          parts = dict(webdataset.read_parts(f, where), __key__=key)
          records.decode(parts, 0, _CHECK_SIZE)
        except errors.BadRecord as e:
          rejected[e.reason] += 1
          continue
        writer.write(records.pack(parts))
        written += 1
  finally:
    writer.close()
  tmp.replace(out / f"{name}.array_record")
  result = dict(source=url, file=f"{name}.array_record", records=written,
                rejected=dict(rejected), missing=False)
  jsonfile.write_atomic(marker, result)
  return result


def convert(shards, out_dir: str, workers: int = 1, log=print) -> dict:
  """Converts the tar shards `shards` (see `webdataset.expand_shards`) into `out_dir`.

  Args:
    shards: the tar shards: a list, comma-separated names, `{000..099}` ranges, or a glob.
    out_dir: the output directory (or URL); created if needed.
    workers: processes converting shards in parallel (1: in this process).
    log: called with the one-line summary.

  Returns:
    The index (also written to `out_dir/index.json`): `num_records`, `shards` (file, records,
    source of each shard found), `missing_shards` and `rejected` (counts by reason).

  Raises:
    ValueError: when no shard is listed or no record is written.
  """
  urls = webdataset.expand_shards(shards)
  if not urls:
    raise ValueError(f"--from={shards!r} names no tar shard.")
  out = epath.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  track = lambda done: progress.track(done, total=len(urls), desc="shards", unit="shard")
  if workers > 1:
    context = multiprocessing.get_context("spawn")  # safe beside threads (JAX, readers)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = [pool.submit(convert_shard, url, out_dir, n) for n, url in enumerate(urls)]
      for _ in track(concurrent.futures.as_completed(futures)):  # counted as they finish
        pass
      results = [f.result() for f in futures]
  else:
    results = list(track(convert_shard(url, out_dir, n) for n, url in enumerate(urls)))
  rejected = collections.Counter()
  for r in results:
    rejected.update(r["rejected"])
  index = dict(num_records=sum(r["records"] for r in results),
               shards=[dict(file=r["file"], records=r["records"], source=r["source"])
                       for r in results if not r["missing"]],
               missing_shards=[r["source"] for r in results if r["missing"]],
               rejected=dict(sorted(rejected.items())))
  jsonfile.write_atomic(out / arrayrecord.INDEX, index)
  log(f"records written: {index['num_records']}; rejected: {index['rejected']}; missing "
      f"shards: {len(index['missing_shards'])} of {len(urls)}; index {out / arrayrecord.INDEX}")
  if index["num_records"] == 0:
    raise ValueError(f"no record of --from={shards!r} could be converted "
                     f"(rejected: {index['rejected']}, missing shards: "
                     f"{len(index['missing_shards'])}).")
  return index


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--from", dest="source", required=True,
                      help="tar shards: a glob, {000..099} ranges, or comma-separated URLs")
  parser.add_argument("--to", dest="out", required=True, help="output directory (or URL)")
  parser.add_argument("--workers", type=int, default=multiprocessing.cpu_count())
  args = parser.parse_args(argv)
  try:
    convert(args.source, args.out, args.workers)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
