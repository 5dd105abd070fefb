"""tdkd's checkpoint format: safetensors tensors plus a JSON manifest, written atomically.

An MPO checkpoint (``decompose`` output) is a directory:

    tdkd.json            manifest (see docs/FORMAT.md; validated before any tensor is used)
    model.safetensors    every tensor of the model: MPO cores as ``<layer>.mpo_core.<k>`` and all
                         untouched tensors (embeddings, biases, LayerNorms, heads) under their
                         ordinary state_dict names; the dense weights of tensorized layers are absent
    tokenizer files      copied from the source model when it had them

Outputs are built in a temporary sibling directory, flushed to disk and renamed into place, so a
crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..core.errors import CheckpointError, OutputError, TdkdError, UsageError

FORMAT = "tdkd-mpo"
FORMAT_VERSION = 1
MANIFEST = "tdkd.json"
TENSORS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
_DTYPES = ("float32", "float16", "bfloat16", "float64")


def core_key(layer: str, k: int) -> str:
    return f"{layer}.mpo_core.{k}"


# ----------------------------------------------------------------------------------------------
# Write failures: one line naming what, where and the operating system's reason
# ----------------------------------------------------------------------------------------------
_REASONS = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EDQUOT: "disk quota exceeded", errno.EIO: "input/output error", errno.EFBIG: "file too large"}


def io_reason(exc: BaseException) -> str | None:
    """The operating system's reason when ``exc`` is a failed write (an OSError, or a library's
    error that wraps one, as safetensors' "I/O error: ... (os error 28)"); None otherwise."""
    if isinstance(exc, TdkdError):
        return None
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        m = re.search(r"os error (\d+)", str(exc))
        code = int(m.group(1)) if m else None
    return _REASONS.get(code)  # other failures (a missing input, a bug) are not write failures


def as_output_error(exc: BaseException, what: str, path) -> OutputError | None:
    reason = io_reason(exc)
    return None if reason is None else OutputError(f"cannot write {what} {path}: {reason}")


@contextlib.contextmanager
def writing(what: str, path) -> Iterator[None]:
    """Turn a failed write inside the block into an OutputError naming ``what`` and ``path``."""
    try:
        yield
    except Exception as exc:
        err = as_output_error(exc, what, path)
        if err is None:
            raise
        raise err from None


def existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing ancestor (where it would be written)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free space of the file system that holds ``path`` (its nearest existing ancestor)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------------------------
# Atomic outputs
# ----------------------------------------------------------------------------------------------
def check_output(path: Path, force: bool) -> None:
    """Refuse an existing output unless --force (checked before any work is done)."""
    if path.exists() and not force:
        raise UsageError(f"output {path} already exists; pass --force to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise UsageError(f"parent directory {parent} of the output does not exist")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                os.fsync(fh.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` in one rename.
    On any failure it is removed and an existing ``path`` is left untouched; a failed write (no
    space, read-only, permission) becomes an OutputError naming ``what`` and ``path``."""
    path = Path(path)
    check_output(path, force)
    with writing(what, path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else "."))
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=tmp.parent))
            os.rename(path, old / path.name)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = as_output_error(exc, what, path) if isinstance(exc, Exception) else None
        if err is None:
            raise
        raise err from None


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    path = Path(path)
    with writing(what, path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else ".")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def atomic_save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None, what: str = "file") -> None:
    """``save_tensors`` to a temporary sibling, then renamed over ``path`` (nothing partial on failure)."""
    path = Path(path)
    with writing(what, path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
        try:
            save_tensors(tensors, Path(tmp), metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# safetensors reading (never pickle)
# ----------------------------------------------------------------------------------------------
def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Read and check a safetensors header: key -> shape. Raises CheckpointError on anything odd."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (too short)")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 * 1024 * 1024):
                raise CheckpointError(f"{path} is not a safetensors file (bad header length)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (header is not a mapping)")
    data_len = size - 8 - n
    shapes: dict[str, tuple[int, ...]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
                and len(info["data_offsets"]) == 2 and all(isinstance(x, int) and x >= 0 for x in info["shape"])
                and all(isinstance(x, int) for x in info["data_offsets"])):
            raise CheckpointError(f"{path} has a malformed entry for tensor {key!r}")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data_len:
            raise CheckpointError(f"{path} is truncated or corrupt (tensor {key!r} lies past the end of the file)")
        shapes[key] = tuple(info["shape"])
    return shapes


def load_tensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """All tensors of a safetensors file, after the header check."""
    safetensors_shapes(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------
def _req(cond: bool, msg: str, where: Path) -> None:
    if not cond:
        raise CheckpointError(f"invalid manifest {where}: {msg}")


def _is_int_list(x, min_len=1) -> bool:
    return isinstance(x, list) and len(x) >= min_len and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def validate_manifest(m: Any, where: Path) -> dict:
    _req(isinstance(m, dict), "not a JSON object", where)
    _req(m.get("format") == FORMAT, f"format is {m.get('format')!r}, expected {FORMAT!r}", where)
    ver = m.get("format_version")
    _req(isinstance(ver, int) and not isinstance(ver, bool), "format_version missing", where)
    _req(ver <= FORMAT_VERSION, f"format_version {ver} is newer than this tdkd understands ({FORMAT_VERSION})", where)
    src = m.get("source")
    _req(isinstance(src, dict) and src.get("family") in ("hf", "timm", "pyg"), "source.family must be 'hf', 'timm' or 'pyg'", where)
    if src["family"] == "hf":
        _req(isinstance(src.get("config"), dict) and isinstance(src["config"].get("model_type"), str), "source.config.model_type missing", where)
        _req(isinstance(src.get("architecture"), str), "source.architecture missing", where)
    else:
        _req(isinstance(src.get("model_name"), str), "source.model_name missing", where)
        _req(isinstance(src.get("kwargs", {}), dict), "source.kwargs must be an object", where)
    tens = m.get("tensors")
    _req(isinstance(tens, dict) and tens.get("file") == TENSORS and isinstance(tens.get("sha256"), str), "tensors entry missing", where)
    layers = m.get("layers")
    _req(isinstance(layers, dict), "layers must be an object", where)
    for name, L in layers.items():
        _req(isinstance(name, str) and isinstance(L, dict), f"layer {name!r} is not an object", where)
        for key in ("out_features", "in_features", "central"):
            _req(isinstance(L.get(key), int) and not isinstance(L.get(key), bool), f"layer {name}: {key} must be an integer", where)
        _req(_is_int_list(L.get("out_shape"), 2) and _is_int_list(L.get("in_shape"), 2), f"layer {name}: factor shapes missing", where)
        n = len(L["out_shape"])
        _req(len(L["in_shape"]) == n, f"layer {name}: factor shapes differ in length", where)
        _req(all(v >= 1 for v in L["out_shape"] + L["in_shape"]), f"layer {name}: factors must be >= 1", where)
        _req(math.prod(L["out_shape"]) == L["out_features"] and math.prod(L["in_shape"]) == L["in_features"],
             f"layer {name}: factor shapes do not multiply to the layer's size", where)
        ws = L.get("weight_shape")
        _req(ws is None or (_is_int_list(ws, 4) and len(ws) == 4 and all(v >= 1 for v in ws) and ws[0] == L["out_features"]
                            and math.prod(ws[1:]) == L["in_features"]),
             f"layer {name}: weight_shape must be [out, in/groups, kh, kw] matching out_features and in_features", where)
        b = L.get("bonds")
        _req(_is_int_list(b, 3) and len(b) == n + 1 and b[0] == 1 and b[-1] == 1 and all(v >= 1 for v in b),
             f"layer {name}: bonds must be n+1 positive integers starting and ending with 1", where)
        _req(L["central"] == (n - 1) // 2, f"layer {name}: central index must be floor((n-1)/2)", where)
        _req(L.get("dtype") in _DTYPES, f"layer {name}: unknown dtype {L.get('dtype')!r}", where)
    return m


def layer_weight_shape(layer: dict) -> tuple[int, ...]:
    """A manifest layer's weight shape: its ``weight_shape`` (Conv2d) or [out_features, in_features]."""
    return tuple(layer.get("weight_shape") or (layer["out_features"], layer["in_features"]))


def read_manifest(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{ckpt} is not a tdkd MPO checkpoint (no {MANIFEST})")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(64 * 1024 * 1024 + 1)
        if len(raw) > 64 * 1024 * 1024:
            raise CheckpointError(f"invalid manifest {path}: too large")
        m = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"invalid manifest {path}: not valid JSON ({type(exc).__name__})") from None
    return validate_manifest(m, path)


def check_tensors_against_manifest(manifest: dict, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Every core exists with the shape its factor shapes and bonds imply."""
    for name, L in manifest["layers"].items():
        b = L["bonds"]
        for k in range(len(L["out_shape"])):
            key = core_key(name, k)
            expect = (b[k], L["out_shape"][k], L["in_shape"][k], b[k + 1])
            if key not in shapes:
                raise CheckpointError(f"{where}: core {key} is missing")
            if tuple(shapes[key]) != expect:
                raise CheckpointError(f"{where}: core {key} has shape {list(shapes[key])}, manifest implies {list(expect)}")
        if f"{name}.weight" in shapes:
            raise CheckpointError(f"{where}: layer {name} has both a dense weight and MPO cores")


def load_mpo_checkpoint(ckpt: Path, verify_hash: bool = True) -> tuple[dict, dict]:
    """Validated (manifest, tensors) of an MPO checkpoint directory."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise UsageError(f"{ckpt} not found")
    manifest = read_manifest(ckpt)
    tfile = ckpt / TENSORS
    shapes = safetensors_shapes(tfile)
    check_tensors_against_manifest(manifest, shapes, tfile)
    if verify_hash and sha256_file(tfile) != manifest["tensors"]["sha256"]:
        raise CheckpointError(f"{tfile} does not match the checksum in its manifest (corrupt or modified)")
    return manifest, load_tensors(tfile)


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copyfile(f, Path(dst) / name)
            copied.append(name)
    return copied


def detect_kind(path: Path) -> str:
    """'mpo' (tdkd MPO checkpoint), 'hf' (HF model directory), 'timm' (timm directory:
    config.json with 'architecture' + model.safetensors), 'pyg' (PyG model directory: config.json
    with format 'tdkd-pyg' + model.safetensors). Raises for anything else."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} not found")
    if path.is_file():
        raise UsageError(f"{path} is a file; expected a model directory (a safetensors state dict needs a model name: use --weights)")
    if (path / MANIFEST).exists():
        return "mpo"
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            c = json.loads(cfg.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{cfg} is not valid JSON") from None
        if isinstance(c, dict) and isinstance(c.get("model_type"), str):
            return "hf"
        if isinstance(c, dict) and isinstance(c.get("architecture"), str):
            return "timm"
        if isinstance(c, dict) and c.get("format") == "tdkd-pyg":
            return "pyg"
    if (path / "run.json").is_file() and ((path / "best").is_dir() or (path / "checkpoints").is_dir()):
        raise UsageError(f"{path} is a tdkd distill run directory, not a model: pass {path / 'best'} (best dev "
                         f"checkpoint) or one of {path / 'checkpoints'}/step-N")
    raise CheckpointError(f"{path} is neither a tdkd checkpoint nor a Hugging Face or timm model directory")
