"""Derived data kept between runs under ``$TDKD_CACHE`` (tokenized splits, teacher outputs, the
built-in data sets made from installed packages): never trusted blindly.

A cache file is safetensors whose metadata records tdkd's cache format and version, the key the
file was made for and a sha256 of its tensors (names, dtypes, shapes and bytes). ``read`` returns
the tensors only when all of that matches; anything else (a flipped byte, a truncated file, a header
that lies about a shape, another format version, a file renamed under another key) is reported as
the reason the file cannot be used, and the caller rebuilds it from the source. A cached folder (an
image set) keeps a ``tdkd-cache.json`` with the digest of its files.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from ..core.errors import CheckpointError, OutputError

CACHE_VERSION = 1
FOLDER_MANIFEST = "tdkd-cache.json"


def stderr_note(text: str) -> None:
    """Where a cache problem is reported when the caller has no reporter of its own."""
    sys.stderr.write(f"note: {text}\n")


def digest(tensors: dict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, sorted by name."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write(path: Path, tensors: dict, kind: str, key: str, what: str) -> None:
    """Write a cache file atomically, with its format, version, key and checksum."""
    path = Path(path)
    with ckpt.writing(what, path):
        path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": f"tdkd-cache/{kind}", "version": str(CACHE_VERSION), "key": key, "sha256": digest(tensors)}
    try:
        ckpt.atomic_save_tensors(tensors, path, metadata=meta, what=what)
    except OutputError as exc:
        raise OutputError(f"{exc} (tdkd's caches live under $TDKD_CACHE: point it at a writable disk with space)") from None


def read(path: Path, kind: str, key: str) -> tuple[dict | None, str | None]:
    """(tensors, None) for a whole cache file of this kind and key; (None, why) for a damaged or
    foreign one; (None, None) when there is none."""
    path = Path(path)
    if not path.is_file():
        return None, None
    try:
        meta = _metadata(path)
        tensors = ckpt.load_tensors(path)
    except CheckpointError as exc:
        return None, f"unreadable: {str(exc).replace(str(path), 'the file')}"
    if meta.get("format") != f"tdkd-cache/{kind}" or meta.get("version") != str(CACHE_VERSION):
        return None, f"cache format {meta.get('format')} version {meta.get('version')}, expected tdkd-cache/{kind} version {CACHE_VERSION}"
    if meta.get("key") != key:
        return None, "made for other inputs (its key differs)"
    if meta.get("sha256") != digest(tensors):
        return None, "its contents do not match their checksum (damaged)"
    return tensors, None


def _metadata(path: Path) -> dict:
    ckpt.safetensors_shapes(path)  # header checks (length, offsets, truncation)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n).decode("utf-8"))
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def discard(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Cached folders
# ----------------------------------------------------------------------------------------------
def folder_digest(root: Path) -> str:
    """sha256 over every file's path (relative) and bytes, the manifest excluded."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != FOLDER_MANIFEST):
        h.update(str(f.relative_to(root)).encode())
        h.update(b"\0")
        h.update(ckpt.sha256_file(f).encode())
    return h.hexdigest()


def seal_folder(root: Path, kind: str) -> None:
    """Record the folder's digest (call inside the atomic directory that builds it)."""
    manifest = {"format": f"tdkd-cache/{kind}", "version": CACHE_VERSION, "sha256": folder_digest(root)}
    (Path(root) / FOLDER_MANIFEST).write_text(json.dumps(manifest) + "\n")


def check_folder(root: Path, kind: str) -> str | None:
    """None when the folder is whole; else why it cannot be used."""
    try:
        manifest = json.loads((Path(root) / FOLDER_MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {FOLDER_MANIFEST} (made by an older tdkd, or partly deleted)"
    if not isinstance(manifest, dict) or manifest.get("format") != f"tdkd-cache/{kind}" or manifest.get("version") != CACHE_VERSION:
        return f"another cache format ({manifest.get('format') if isinstance(manifest, dict) else '?'})"
    if manifest.get("sha256") != folder_digest(root):
        return "its files do not match their checksum (damaged or partial)"
    return None


def ensure_folder(root: Path, kind: str, build: Callable[[Path], None], note: Callable[[str], None] = stderr_note) -> Path:
    """The cached folder ``root``, rebuilt (atomically, sealed) when missing or damaged."""
    root = Path(root)
    if root.is_dir():
        why = check_folder(root, kind)
        if why is None:
            return root
        note(f"cache {root}: {why}; rebuilding it")
    with ckpt.writing("cache", root):
        root.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.atomic_dir(root, force=True, what="cache") as tmp:
        build(tmp)
        seal_folder(tmp, kind)
    return root
