"""A torch-free reader of PyTorch `.pth` files (`torch.save`'s zip format), for importing
published checkpoints.

The zip holds `<name>/data.pkl`, a pickle whose tensors point at raw storages
`<name>/data/<key>` through persistent ids `('storage', storage_type, key, location, numel)`
and are rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.

The unpickler is restricted: `find_class` knows only the tensor rebuilders, the storage
types, `collections.OrderedDict`, a few builtins and numpy scalars; `argparse.Namespace`,
`pathlib` paths and `torch.device` (found in the training script's `args`) become inert
records. Any other global is refused, so no code from the file ever runs. Tensors are read
lazily (`PthTensor.numpy()`): an optimizer state next to the weights costs nothing unless read.
The legacy (pre-1.6, non-zip) format and TorchScript archives are refused.
"""

import collections
import dataclasses
import io
import pickle
import zipfile

import ml_dtypes
import numpy as np

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first object of a pre-1.6 torch.save file


class PthError(ValueError):
  """A file that is not a readable torch zip checkpoint, or holds something refused."""


@dataclasses.dataclass(frozen=True)
class _Storage:
  dtype: np.dtype
  key: str
  numel: int
  read: object = dataclasses.field(repr=False, compare=False)  # () -> the storage's elements


@dataclasses.dataclass(frozen=True)
class PthTensor:
  """A tensor of the file, not yet read: `numpy()` reads it (a copy, C-contiguous)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  stride: tuple[int, ...]
  offset: int
  storage: _Storage

  def numpy(self) -> np.ndarray:
    data = self.storage.read()
    if not self.shape:
      if self.offset >= data.size:
        raise PthError(f"a tensor's offset {self.offset} is past its storage ({data.size}).")
      return data[self.offset].copy()
    if any(n == 0 for n in self.shape):
      return np.zeros(self.shape, self.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
    if min(self.stride) < 0 or self.offset < 0 or last >= data.size:
      raise PthError(f"a tensor of shape {self.shape}, stride {self.stride} and offset "
                     f"{self.offset} reaches past its storage of {data.size} elements.")
    item = data.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], self.shape, tuple(s * item for s in self.stride), writeable=False)
    return np.ascontiguousarray(view)


class Record:
  """An inert stand-in for an object of the file that dpvl does not rebuild (an argparse
  Namespace, a path, a device): it keeps its constructor arguments and state, nothing runs."""

  qualname = "object"

  def __init__(self, *args):
    self.args = args
    self.state = None

  def __setstate__(self, state):
    self.state = state

  def __getattr__(self, name):  # a Namespace's fields, from its pickled __dict__
    state = self.__dict__.get("state")
    if isinstance(state, dict) and name in state:
      return state[name]
    raise AttributeError(name)

  def __repr__(self):
    return f"<{self.qualname} {self.args or ''}{self.state or ''}>"


def _record_type(qualname: str) -> type:
  return type("Record", (Record,), {"qualname": qualname})


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None,
                       metadata=None):
  del requires_grad, hooks, metadata
  if not isinstance(storage, _Storage):
    raise PthError("a tensor rebuild without a storage of the file.")
  return PthTensor(tuple(int(n) for n in size), storage.dtype, tuple(int(s) for s in stride),
                   int(offset), storage)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
  del requires_grad, hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # a Tensor or Parameter subclass: its data is what matters here
  return func(*args)


def _numpy_scalar(dtype, data=None):
  return np.frombuffer(data, dtype=dtype)[0] if data is not None else np.zeros((), dtype)[()]


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex, ("builtins", "slice"): slice,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}
_RECORDS = {("argparse", "Namespace"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("pathlib", "Path"),
            ("torch", "device"), ("torch", "Size")}
_TENSOR_GLOBALS = {("torch", "Tensor"), ("torch.nn.parameter", "Parameter")}


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals listed above; storages come from `read`."""

  def __init__(self, data: bytes, read):
    super().__init__(io.BytesIO(data))
    self._read = read

  def find_class(self, module, name):
    if (module, name) in _GLOBALS:
      return _GLOBALS[module, name]
    if (module, name) in _RECORDS:
      return _record_type(f"{module}.{name}")
    if module == "torch" and name in STORAGE_DTYPES:
      return ("storage_type", name)
    if (module, name) in _TENSOR_GLOBALS:
      return ("tensor_type", name)
    raise PthError(f"the checkpoint's pickle names the global {module}.{name}, which this "
                   "reader refuses (it rebuilds tensors, containers and numbers only).")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise PthError(f"unknown persistent id {pid!r} (expected a torch storage).")
    _, storage_type, key, _, numel = pid
    if not (isinstance(storage_type, tuple) and storage_type[0] == "storage_type"):
      raise PthError(f"storage {key!r} has an unsupported type {storage_type!r}.")
    dtype, key = np.dtype(STORAGE_DTYPES[storage_type[1]]), str(key)
    return _Storage(dtype, key, int(numel), lambda: self._read(dtype, key, int(numel)))


def _archive_prefix(names: list[str], path: str) -> str:
  pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    if any(n.endswith("constants.pkl") for n in names):
      raise PthError(f"{path} is a TorchScript archive, not a torch.save checkpoint.")
    raise PthError(f"{path} is a zip file but not a torch checkpoint (no <name>/data.pkl).")
  return pickles[0][:-len("data.pkl")]


def _check_not_legacy(path: str) -> None:
  with open(path, "rb") as f:
    head = f.read(64)
  magic = pickle.dumps(_LEGACY_MAGIC, protocol=2)[2:-1]  # the long, without protocol and STOP
  if head[:2] == b"\x80\x02" and head[2:2 + len(magic)] == magic:
    raise PthError(f"{path} is in torch's legacy (pre-1.6) format, which this reader does not "
                   "read; re-save it with torch.save(obj, path) from torch >= 1.6.")
  raise PthError(f"{path} is not a torch zip checkpoint (torch.save's format since 1.6).")


def load(path: str):
  """The object `torch.save` wrote to `path`, its tensors as lazy `PthTensor`s.

  Raises:
    PthError: if the file is not a torch zip checkpoint (legacy and TorchScript files
      included), names a global outside the whitelist, or a storage does not fit its tensors.
  """
  if not zipfile.is_zipfile(path):
    _check_not_legacy(path)
  archive = zipfile.ZipFile(path)
  names = archive.namelist()
  prefix = _archive_prefix(names, path)
  order = "little"
  if prefix + "byteorder" in names:
    order = archive.read(prefix + "byteorder").decode().strip()
  cache = {}

  def read(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
    if key not in cache:
      name = f"{prefix}data/{key}"
      if name not in names:
        raise PthError(f"{path} lacks the storage {name}.")
      raw = archive.read(name)
      if len(raw) != numel * dtype.itemsize:
        raise PthError(f"storage {name} holds {len(raw)} bytes, not {numel} {dtype} elements.")
      stored = dtype.newbyteorder("<" if order == "little" else ">")
      cache[key] = np.frombuffer(raw, stored).astype(dtype, copy=False)
    return cache[key]

  try:
    return _Unpickler(archive.read(prefix + "data.pkl"), read).load()
  except PthError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # a corrupt or unexpected pickle
    raise PthError(f"{path}: its pickle cannot be read ({type(e).__name__}: {e}).") from e


def state_dict(obj, key: str = "model") -> dict:
  """The state dict in a loaded checkpoint: `obj[key]` (MAE-style files), or `obj` itself when
  it maps names to tensors. PthError if neither."""
  if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
    obj = obj[key]
  elif isinstance(obj, dict) and key not in obj and not all(
      isinstance(v, PthTensor) for v in obj.values()):
    raise PthError(f"the checkpoint has no entry {key!r} (its entries: {sorted(map(str, obj))}).")
  if not isinstance(obj, dict) or not all(isinstance(v, PthTensor) for v in obj.values()):
    raise PthError(f"the checkpoint's entry {key!r} is not a state dict of tensors.")
  return dict(obj)
