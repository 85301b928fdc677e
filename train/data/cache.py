"""On-disk cache of decoded, resampled and normalised cases.

Decoding a ``.nii.gz`` and resampling it costs far more than reading a patch,
so each preprocessed case is stored once as ``.npy`` files and read back
memory-mapped: a patch read touches only the pages it needs, and no epoch after
the first decodes gzip again.

Entries are keyed by the SHA-256 of the source files' contents and the
preprocessing options (plus a format version), so editing a file or changing
the target spacing makes a new entry instead of serving a stale one. Layout::

    CACHE_DIR/ab/abcdef.../image.npy   float32 (D, H, W, C)
                          label.npy    int32 (D, H, W), when labelled
                          meta.json    name, affine, spacing

Entries are written to a temporary folder and renamed into place, so several
loader processes may fill the same cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

FORMAT_VERSION = 1
_CHUNK = 1 << 20

# np.load parses each header with ast.literal_eval, and CPython 3.11's parser
# is not thread-safe ("SystemError: AST constructor recursion depth mismatch"
# when grain's prefetch threads load cases at once): loads take turns.
_NPY_LOCK = threading.Lock()


def load_npy(path, mmap_mode: str | None = None) -> np.ndarray:
    """``np.load`` of one ``.npy`` file, safe to call from several threads."""
    with _NPY_LOCK:
        return np.load(path, mmap_mode=mmap_mode)


# Content hashes by (path, size, mtime): a file is hashed once per process.
_hash_memo: dict[tuple[str, int, int], str] = {}


def file_digest(path: str) -> str:
    """SHA-256 of a file's contents, memoised by path, size and mtime."""
    path = os.path.realpath(os.fspath(path))
    stat = os.stat(path)
    memo_key = (path, stat.st_size, stat.st_mtime_ns)
    digest = _hash_memo.get(memo_key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
        digest = _hash_memo[memo_key] = h.hexdigest()
    return digest


def cache_key(files: Sequence[str], options: Mapping[str, Any]) -> str:
    """Key of the entry made from ``files`` (in order) with ``options``.

    ``options`` must be JSON-serialisable; key order does not matter.
    """
    payload = {
        "version": FORMAT_VERSION,
        "files": [file_digest(f) for f in files],
        "options": options,
    }
    text = json.dumps(payload, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cache options must be JSON-serialisable, got {type(value).__name__}")


class VolumeCache:
    """A folder of preprocessed cases (see the module docstring)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def _entry(self, key: str) -> str:
        return os.path.join(self.root, key[:2], key)

    def load(self, key: str) -> dict | None:
        """The cached case for ``key`` (arrays memory-mapped), or None."""
        entry = self._entry(key)
        meta_path = os.path.join(entry, "meta.json")
        if not os.path.isfile(meta_path):
            return None
        with open(meta_path) as f:
            meta = json.load(f)
        case = {
            "image": load_npy(os.path.join(entry, "image.npy"), mmap_mode="r"),
            "affine": np.asarray(meta["affine"], np.float64),
            "spacing": np.asarray(meta["spacing"], np.float64),
            "name": meta["name"],
        }
        if meta["labelled"]:
            case["label"] = load_npy(os.path.join(entry, "label.npy"), mmap_mode="r")
        return case

    def store(self, key: str, case: Mapping[str, Any]) -> None:
        """Writes ``case`` under ``key``; a concurrent writer of the same key wins."""
        entry = self._entry(key)
        if os.path.isdir(entry):
            return
        parent = os.path.dirname(entry)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
        try:
            np.save(os.path.join(tmp, "image.npy"), np.asarray(case["image"], np.float32))
            if "label" in case:
                np.save(os.path.join(tmp, "label.npy"), np.asarray(case["label"], np.int32))
            meta = {
                "name": case["name"],
                "affine": np.asarray(case["affine"], np.float64).tolist(),
                "spacing": np.asarray(case["spacing"], np.float64).tolist(),
                "labelled": "label" in case,
            }
            # meta.json last: its presence marks a complete entry.
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f)
            try:
                os.rename(tmp, entry)
            except OSError:  # another process stored it first
                pass
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def get_or_build(
        self, files: Sequence[str], options: Mapping[str, Any], build: Callable[[], dict]
    ) -> dict:
        """The cached case for ``files`` and ``options``, building it on a miss."""
        key = cache_key(files, options)
        case = self.load(key)
        if case is None:
            self.store(key, build())
            case = self.load(key)
        return case
