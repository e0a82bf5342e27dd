"""JSON files that are never seen half-written (ledgers, configs, dataset indices, markers)."""

import json

from etils import epath


def write_atomic(path, obj) -> None:
  """Writes `obj` as JSON to `path` (local or any `etils.epath` URL) through a temporary file
  renamed over it: a reader sees the old file or the new one, never a partial one."""
  path = epath.Path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)
