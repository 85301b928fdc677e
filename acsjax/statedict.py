"""Read PyTorch and safetensors weight files into numpy, without PyTorch.

Formats, told apart by content rather than file name:

* safetensors: 8-byte little-endian header length, a JSON header (dtype,
  shape and byte range per tensor, optional ``__metadata__``), raw bytes;
* PyTorch zip (``torch.save`` since 1.6): ``ARCHIVE/data.pkl``, one record
  ``ARCHIVE/data/<key>`` per storage, ``ARCHIVE/byteorder``;
* PyTorch legacy (``_use_new_zipfile_serialization=False``): pickled magic
  number, protocol version and system info, the pickled object, the pickled
  storage-key list, then per storage an int64 element count and its bytes.

Pickles go through an unpickler that resolves only the globals needed to
rebuild tensors and plain containers, each to a local stand-in; any other
global raises :class:`UnsafeCheckpointError` before anything of it runs.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["UnsafeCheckpointError", "load_state_dict", "save_safetensors"]


class UnsafeCheckpointError(ValueError):
    """A pickle asked for a global outside the tensor-rebuilding whitelist."""


# torch dtype -> numpy type of its little-endian bytes. bfloat16 is read as
# uint16 and widened to float32, which is exact (it is float32's top half).
_DTYPES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "bool": "?",
    "complex64": "<c8", "complex128": "<c16",
}
# Names under which pickles refer to dtypes: torch.<dtype>, its aliases, and
# the typed storage classes (an UntypedStorage holds bytes).
_TORCH_NAMES = {n: n for n in _DTYPES} | {
    "double": "float64", "float": "float32", "half": "float16", "long": "int64",
    "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
# safetensors dtype -> torch dtype, in the order the reference writer lays
# tensors out (widest first, which keeps every tensor aligned; then by name).
_SAFETENSORS = {
    "U64": "uint64", "I64": "int64", "F64": "float64", "C64": "complex64",
    "F32": "float32", "U32": "uint32", "I32": "int32", "BF16": "bfloat16",
    "F16": "float16", "U16": "uint16", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# Keys under which training scripts nest the weights, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema", "state_dict_ema", "model_ema")


def _raw_dtype(name: str, byteorder: str = "<") -> np.dtype:
    dt = np.dtype(_DTYPES[name])
    return dt.newbyteorder(byteorder) if dt.itemsize > 1 else dt


# --- what the whitelisted globals resolve to ---------------------------------

class _Frozen:
    # pickle's BUILD opcode would set attributes on an object after the call
    # that made it; refusing it keeps a tensor's layout as the rebuild saw it.
    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError(f"pickle tries to set the state of a {type(self).__name__}")


class _Dtype(_Frozen):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage(_Frozen):
    """A storage named in the pickle; its bytes are read after unpickling."""
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor(_Frozen):
    __slots__ = ("storage", "offset", "size", "stride", "dtype", "conj", "neg")

    def __init__(self, storage, offset, size, stride, dtype=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise ValueError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
        if not isinstance(dtype, (_Dtype, type(None))):
            raise ValueError(f"tensor dtype is a {type(dtype).__name__}")
        metadata = dict(metadata or {})
        if set(metadata) - {"conj", "neg"}:
            raise ValueError(f"unsupported tensor metadata {sorted(metadata)}")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
        self.dtype = dtype.name if dtype else storage.dtype
        self.conj, self.neg = bool(metadata.get("conj")), bool(metadata.get("neg"))


_TENSOR_TYPE = _Frozen()  # torch.Tensor / nn.Parameter as the target type of a rebuild


def _rebuild_tensor(storage, offset, size, stride):
    return _Tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _Tensor(storage, offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _Tensor(storage, offset, size, stride, dtype, metadata)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, _Tensor):
        raise ValueError(f"parameter wraps a {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # A tensor with Python attributes: keep the tensor, drop the attributes.
    if func not in _REBUILDERS or new_type is not _TENSOR_TYPE:
        raise UnsafeCheckpointError("tensor subclass rebuilt by an unknown function or type")
    return func(*args)


def _device(*args) -> str:
    return ":".join(map(str, args))


def _latin1_encode(text, encoding="latin1"):
    # How protocol-2 pickles spell a bytes object.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode called with unexpected arguments")
    return text.encode("latin1")


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TENSOR_TYPE,
    ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
    ("torch.storage", "UntypedStorage"): _Dtype("uint8"),
    ("torch", "Size"): tuple,
    ("torch", "device"): _device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _latin1_encode,
} | {("torch", name): _Dtype(dtype) for name, dtype in _TORCH_NAMES.items()}


class _Unpickler(pickle.Unpickler):
    """Resolves whitelisted globals to stand-ins and storage ids to _Storage."""

    def __init__(self, file, storages: dict[str, _Storage] | None = None):
        super().__init__(file)
        self.storages = {} if storages is None else storages

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # protocol-2 spelling
        found = _GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name.endswith("Storage"):
            raise ValueError(f"unsupported storage type torch.{name}")
        hint = ("the file holds a pickled nn.Module, not a plain tensor dict; save "
                "model.state_dict() instead" if module.startswith("torch.nn.") else
                "only tensors and plain containers are allowed, a pickled object could run code")
        raise UnsafeCheckpointError(f"refusing pickle global {module}.{name}: {hint}")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel[, view]) in both formats.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")):
            raise ValueError(f"unexpected persistent id {str(pid)[:80]!r}")
        stype, key, _location, numel = pid[1:5]
        if not isinstance(stype, _Dtype) or type(numel) is not int or numel < 0:
            raise ValueError(f"malformed storage reference {str(pid)[:80]!r}")
        if len(pid) == 6 and pid[5] is not None:
            raise ValueError("storage views (written by torch before 1.0) are not supported")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = self.storages.setdefault(key, _Storage(key, stype.name, numel))
        if (storage.dtype, storage.numel) != (stype.name, numel):
            raise ValueError(f"storage {key} is referenced with two different types or sizes")
        return storage


# --- from storages to arrays -------------------------------------------------

def _to_numpy(t: _Tensor, read_storage, byteorder: str) -> np.ndarray:
    """The tensor's elements from its storage's bytes, after bounds checks."""
    if t.dtype not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    dt = _raw_dtype(t.dtype, byteorder)
    offset, size, stride = t.offset, t.size, t.stride
    if len(size) != len(stride) or not all(type(v) is int and v >= 0 for v in (offset, *size, *stride)):
        raise ValueError(f"malformed tensor layout offset={offset} size={size} stride={stride}")
    raw = read_storage(t.storage)
    n = raw.nbytes // dt.itemsize
    if 0 in size:
        arr = np.empty(size, dt)
    else:
        # as_strided trusts its arguments, so the last element must be checked.
        last = offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= n:
            raise ValueError(f"tensor reaches element {last} of a storage of {n}")
        elems = raw[: n * dt.itemsize].view(dt)[offset:]
        view = np.lib.stride_tricks.as_strided(
            elems, size, [s * dt.itemsize for s in stride], writeable=False)
        arr = np.array(view)  # own the data: tensors sharing a storage stay independent
    if t.dtype == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    elif not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if t.neg:
        arr = -arr
    return np.conj(arr) if t.conj else arr


def _read_exact(f, nbytes: int, what: str) -> np.ndarray:
    buf = np.empty(nbytes, np.uint8)
    got = f.readinto(memoryview(buf)) if nbytes else 0
    if got != nbytes:
        raise ValueError(f"truncated: {what} needs {nbytes} bytes, found {got}")
    return buf


def _nbytes(s: _Storage) -> int:
    return s.numel * _raw_dtype(s.dtype).itemsize


def _load_zip(path: Path, pick) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise ValueError("zip archive without exactly one ARCHIVE/data.pkl: not a PyTorch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        if prefix + "constants.pkl" in names:
            raise ValueError("a TorchScript archive (torch.jit.save), not a tensor dict")
        mark = zf.read(prefix + "byteorder") if prefix + "byteorder" in names else b"little"
        if mark not in (b"little", b"big"):
            raise ValueError(f"unknown byteorder record {mark[:20]!r}")
        storages: dict[str, _Storage] = {}
        with zf.open(pkls[0]) as fh:
            tensors = pick(_Unpickler(fh, storages).load())

        @functools.cache
        def read_storage(s: _Storage) -> np.ndarray:
            name = f"{prefix}data/{s.key}"
            if name not in names or zf.getinfo(name).file_size < _nbytes(s):
                raise ValueError(f"storage record {name} is missing or truncated")
            with zf.open(name) as fh:
                return _read_exact(fh, _nbytes(s), f"storage record {name}")

        byteorder = "<" if mark == b"little" else ">"
        return {k: _to_numpy(t, read_storage, byteorder) for k, t in tensors.items()}


def _load_legacy(path: Path, pick) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        if _Unpickler(f).load() != _LEGACY_MAGIC:
            raise ValueError("pickle file without PyTorch's magic number: not a checkpoint")
        if (version := _Unpickler(f).load()) != _LEGACY_PROTOCOL:
            raise ValueError(f"unsupported legacy protocol version {version!r}")
        _Unpickler(f).load()  # system info; storages are little-endian whatever it says
        storages: dict[str, _Storage] = {}
        tensors = pick(_Unpickler(f, storages).load())
        keys = _Unpickler(f).load()
        if not isinstance(keys, list):
            raise ValueError("malformed storage key list")
        # The storages follow one another; note where each one's bytes start.
        file_size, where = os.fstat(f.fileno()).st_size, {}
        for key in keys:
            if key not in storages:
                raise ValueError(f"storage key {str(key)[:40]!r} is not used by the pickle")
            header = f.read(8)
            numel = struct.unpack("<q", header)[0] if len(header) == 8 else -1
            if numel != storages[key].numel or f.tell() + _nbytes(storages[key]) > file_size:
                raise ValueError(f"storage {key} is truncated or has the wrong size")
            where[key] = f.tell()
            f.seek(_nbytes(storages[key]), os.SEEK_CUR)

        @functools.cache
        def read_storage(s: _Storage) -> np.ndarray:
            if s.key not in where:
                raise ValueError(f"storage {s.key} has no data in the file")
            f.seek(where[s.key])
            return _read_exact(f, _nbytes(s), f"storage {s.key}")

        return {k: _to_numpy(t, read_storage, "<") for k, t in tensors.items()}


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(file_size - 8, 100 << 20):
            raise ValueError(f"header length {n} exceeds the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
            raise ValueError(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        header.pop("__metadata__", None)
        out = {}
        for name, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"malformed header entry for {name!r}") from None
            if dtype not in _SAFETENSORS:
                raise ValueError(f"unsupported dtype {dtype!r} of {name!r}")
            if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
                raise ValueError(f"malformed shape {shape!r} of {name!r}")
            dt = _raw_dtype(_SAFETENSORS[dtype])
            nbytes = math.prod(shape) * dt.itemsize
            if not (type(begin) is type(end) is int and 0 <= begin and end - begin == nbytes
                    and 8 + n + end <= file_size):
                raise ValueError(f"byte range {[begin, end]} of {name!r} does not fit its shape or the file")
            f.seek(8 + n + begin)
            arr = _read_exact(f, nbytes, repr(name)).view(dt).reshape(shape)
            out[name] = (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else arr
        return out


# --- public API ----------------------------------------------------------------

def _picker(is_tensor, key: str | None):
    """Finds the tensor dict inside a checkpoint object (see load_state_dict)."""

    def what(v) -> str:
        return "tensor" if is_tensor(v) else type(v).__name__.lstrip("_")

    def pick(obj):
        if key is not None:
            if not isinstance(obj, dict) or key not in obj:
                raise ValueError(f"checkpoint has no top-level key {key!r}")
            obj = obj[key]
        for _ in range(4):
            if not isinstance(obj, dict):
                raise ValueError(f"not a plain tensor dict: holds a {what(obj)}")
            if obj and all(is_tensor(v) for v in obj.values()):
                break
            inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                bad = next(((k, v) for k, v in obj.items() if not is_tensor(v)), None)
                if bad is None:
                    raise ValueError("holds no tensors")
                raise ValueError(f"not a plain tensor dict: {str(bad[0])[:60]!r} holds a {what(bad[1])}")
            obj = obj[inner]
        if not all(isinstance(k, str) for k in obj):
            raise ValueError("not a plain tensor dict: a key is not a string")
        if all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
            return {k[len("module."):]: v for k, v in obj.items()}
        return dict(obj)

    return pick


def _sniff(head: bytes) -> str | None:
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and _LEGACY_MAGIC.to_bytes(10, "little") in head[:32]:
        return "legacy"  # a pickle (PROTO opcode) whose first value is the magic number
    if head[257:262] == b"ustar":
        return "tar"
    if head[8:9] == b"{":
        return "safetensors"
    return None


def _load_with_torch(path: Path, key: str | None) -> dict[str, np.ndarray]:
    try:
        import torch  # only here: acsjax itself never needs torch
    except ImportError:
        raise ImportError("load_state_dict(use_torch=True) needs PyTorch installed") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message runs to paragraphs; keep the part with the reason.
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", str(e), re.S)
        reason = reason.group(1) if reason else str(e).splitlines()[0]
        raise UnsafeCheckpointError(f"torch.load(weights_only=True) refused it: {reason}") from None
    except RuntimeError as e:
        raise ValueError(f"torch.load failed: {str(e).splitlines()[0]}") from None
    out = {}
    for k, t in _picker(lambda v: isinstance(v, torch.Tensor), key)(obj).items():
        t = t.detach().resolve_conj().resolve_neg()
        out[k] = np.array((t.float() if t.dtype == torch.bfloat16 else t).numpy(), copy=True)
    return out


def load_state_dict(path: str | os.PathLike, *, use_torch: bool = False,
                    key: str | None = None) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` or PyTorch ``.pth``/``.pt``/``.bin``/``.tar`` weight file.

    The format is told by the file's content. A PyTorch checkpoint may be a
    flat ``{name: tensor}`` dict or nest one under ``'state_dict'``,
    ``'model_state_dict'``, ``'model'`` or ``'ema'`` (the first found; ``key``
    names the top-level entry explicitly); a ``'module.'`` prefix on every name
    (``nn.DataParallel``) is removed. Returns ``{name: np.ndarray}`` in the
    stored dtypes, except bfloat16, which becomes float32 (exactly).

    ``use_torch=True`` reads PyTorch files with ``torch.load(path,
    map_location='cpu', weights_only=True)`` instead (torch must be
    installed); safetensors files are read here either way.

    Raises :class:`UnsafeCheckpointError` for a pickle that needs any global
    beyond those that rebuild tensors and plain containers (none of its code
    runs), and ``ValueError`` naming the file for a file that is malformed,
    truncated, or not a plain tensor dict.
    """
    path = Path(path)
    with open(path, "rb") as f:
        kind = _sniff(f.read(512))
    try:
        if kind is None:
            raise ValueError("neither a safetensors file nor a PyTorch checkpoint")
        if kind == "tar":
            raise ValueError("PyTorch's pre-1.0 tar format is not supported; re-save it with a newer torch")
        if kind == "safetensors":
            return _load_safetensors(path)
        if use_torch:
            return _load_with_torch(path, key)
        pick = _picker(lambda v: isinstance(v, _Tensor), key)
        return (_load_zip if kind == "zip" else _load_legacy)(path, pick)
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"{path}: {_one_line(e)}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {_one_line(e)}") from None
    except ImportError:
        raise
    except Exception as e:  # pickle, zipfile and zlib fail in many ways on damaged bytes
        raise ValueError(f"{path}: corrupt or truncated file ({type(e).__name__}: {_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                     metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` as a ``.safetensors`` file, laid out as the reference writer does.

    Arrays of dtype ``ml_dtypes.bfloat16`` are stored as BF16. ``metadata``, an
    optional ``{str: str}`` dict, is stored under ``__metadata__``.
    """
    path = Path(path)
    codes = {np.dtype(d).name: k for k, d in _SAFETENSORS.items() if k != "BF16"} | {"bfloat16": "BF16"}
    arrays = {}
    for name, value in tensors.items():
        arr = np.asarray(value)
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"{path}: invalid tensor name {name!r}")
        if arr.dtype.name not in codes:
            raise ValueError(f"{path}: {name!r} has dtype {arr.dtype}, which safetensors cannot store")
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"{path}: metadata must map str to str")
    rank = {code: i for i, code in enumerate(_SAFETENSORS)}
    order = sorted(arrays, key=lambda k: (rank[codes[arrays[k].dtype.name]], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": codes[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:  # written aside, then renamed: no half-written file
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8))
    os.replace(tmp, path)
