"""Data sets: GLUE tasks from their standard TSV files, generic CSV/JSONL with named columns,
Hugging Face data sets (save_to_disk directories, parquet and arrow files: hf_data.py), and
image folders (one sub-folder per class) for timm models.

A text data set is a list of examples (texts tuple, label) plus the task description; tokenization
and batching happen in the consumer (eval, distill)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from . import caches, hf_data
from ..core.errors import UsageError

csv.field_size_limit(10 * 1024 * 1024)


@dataclass(frozen=True)
class Task:
    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]
    dev_file: str = "dev.tsv"
    header: bool = True
    # for header-less files: column positions of (texts..., label)
    positions: tuple[int, ...] | None = None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


TASKS: dict[str, Task] = {
    "sst2": Task("sst2", ("sentence",), "label", ("0", "1"), ("accuracy",)),
    "rte": Task("rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "mrpc": Task("mrpc", ("#1 String", "#2 String"), "Quality", ("0", "1"), ("f1", "accuracy")),
    "cola": Task("cola", ("sentence",), "label", ("0", "1"), ("matthews",), header=False, positions=(3, 1)),
    "stsb": Task("stsb", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
    "qnli": Task("qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"), ("accuracy",)),
    "qqp": Task("qqp", ("question1", "question2"), "is_duplicate", ("0", "1"), ("f1", "accuracy")),
    "mnli": Task("mnli", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
                 ("accuracy",), dev_file="dev_matched.tsv"),
}
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "glue/sst-2": "sst2"}


BUILTIN_DATA = {"sst2-sample": "sst2", "digits": None}


def resolve_data(spec: str, note: Callable[[str], None] | None = None) -> tuple[Path, str | None]:
    """A data path, or ``builtin:NAME`` for a data set shipped with tdkd: (path, its task or None).
    ``note`` hears of a damaged cached data set being rebuilt."""
    if str(spec).startswith("builtin:"):
        name = str(spec).split(":", 1)[1]
        if name not in BUILTIN_DATA:
            raise UsageError(f"unknown built-in data set {name!r} (known: {', '.join('builtin:' + k for k in BUILTIN_DATA)})")
        if name == "digits":
            return digits_folder(cache_root() / "digits-v1", note), None
        return Path(__file__).resolve().parent.parent / "data" / name, BUILTIN_DATA[name]
    return Path(spec).expanduser(), None


def digits_folder(path: Path, note: Callable[[str], None] | None = None) -> Path:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as an image
    folder PATH/{train,dev}/CLASS/i.png, made once (atomically, sealed with a digest, rebuilt when
    damaged: io/caches.py); every fifth image is in dev."""
    def build(tmp: Path) -> None:
        from PIL import Image
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            cls = tmp / ("dev" if i % 5 == 0 else "train") / str(int(label))
            cls.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 255 / 16).astype("uint8")).convert("RGB").save(cls / f"{i:04d}.png")

    return caches.ensure_folder(path, "digits", build, note or caches.stderr_note)


def get_task(name: str) -> Task:
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise UsageError(f"unknown task {name!r}; known: {', '.join(TASKS)} (or use --text-column/--label-column)")
    return TASKS[key]


def guess_task(path: Path) -> Task | None:
    for part in reversed(Path(path).resolve().parts):
        key = TASK_ALIASES.get(part.lower(), part.lower().replace("-", ""))
        if key in TASKS:
            return TASKS[key]
    return None


@dataclass
class TextData:
    task: Task
    texts: list[tuple[str, ...]]
    labels: list  # int class ids, or floats for regression
    path: Path
    label_names: tuple[str, ...] | None = None
    raw_labels: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


def resolve_file(data: Path, task: Task | None, split: str) -> Path:
    data = Path(data)
    if not data.exists():
        raise UsageError(f"data {data} not found")
    if data.is_file() or hf_data.is_hf_dataset_dir(data):
        return data
    name = task.dev_file if (task and split == "dev") else f"{split}.tsv"
    for cand in (data / name, data / f"{split}.tsv", data / f"{split}.csv", data / f"{split}.jsonl"):
        if cand.is_file():
            return cand
    found = hf_data.split_file(data, split)
    if found is not None:
        return found
    raise UsageError(f"no {split} split in {data} (looked for {name}, {split}.tsv/.csv/.jsonl/.parquet/.arrow"
                     f"{', validation.parquet/.arrow' if split == 'dev' else ''})")


def _read_rows(path: Path, header: bool) -> tuple[list[str] | None, list[list[str]] | list[dict]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise UsageError(f"{path}:{i}: each JSONL line must be an object")
                        rows.append(obj)
            return None, rows
        delim = "," if suffix == ".csv" else "\t"
        quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.reader(fh, delimiter=delim, quoting=quoting)
            rows = [r for r in reader if r]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if header:
        if not rows:
            raise UsageError(f"{path} is empty")
        return rows[0], rows[1:]
    return None, rows


def _read_hf(path: Path, split: str, task: Task | None) -> tuple[None, list[dict], Task]:
    """Rows of a Hugging Face data set, its task (guessed from GLUE column names when not given),
    and labels as strings: ClassLabel names, or the integer ids when the task's labels are numbers."""
    rows, class_labels = hf_data.read(path, split)
    if not rows:
        raise UsageError(f"{path} has no examples")
    if task is None:
        cols = hf_data.guess_columns(rows[0])
        if cols is None or "label" not in rows[0]:
            raise UsageError(f"cannot tell the task of {path} (columns: {', '.join(rows[0])}): "
                             f"pass --task or --text-column/--label-column")
        task = Task("custom", cols, "label", None, ("accuracy",))
    names = class_labels.get(task.label_column)
    if names:
        numeric = task.labels is not None and all(x.lstrip("-").isdigit() for x in task.labels)
        if task.labels is None:
            task = replace(task, labels=tuple(names))

        def name(v):
            ok = isinstance(v, int) and 0 <= v < len(names)
            return str(v) if numeric or not ok else names[v]

        rows = [dict(r, **{task.label_column: name(r.get(task.label_column))}) for r in rows]
    return None, rows, task


def load_text(
    data: Path,
    task: Task | None = None,
    split: str = "dev",
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    limit: int | None = None,
) -> TextData:
    """Read a GLUE task file, a generic CSV/TSV/JSONL file with named columns, or Hugging Face
    data (a save_to_disk directory, parquet or arrow files; hf_data.py)."""
    if task is None and text_columns:
        labels_given = None
        task = Task("custom", tuple(text_columns), label_column or "label", labels_given, ("accuracy",))
    if task is None:
        task = guess_task(Path(data))
    if task is not None and text_columns:
        task = Task(task.name, tuple(text_columns), label_column or task.label_column, task.labels, task.metrics)
    path = resolve_file(Path(data), task, split)
    if hf_data.is_hf(path):
        header, rows, task = _read_hf(path, split, task)
    else:
        if task is None:
            raise UsageError(f"cannot tell the task of {data}: pass --task (one of {', '.join(TASKS)}) or --text-column/--label-column")
        header, rows = _read_rows(path, task.header and path.suffix.lower() != ".jsonl")
    texts, raw = [], []
    if rows and isinstance(rows[0], dict):
        missing = [c for c in task.text_columns + (task.label_column,) if c not in rows[0]]
        if missing:
            raise UsageError(f"{path} has no column {missing[0]!r} (columns: {', '.join(rows[0])})")
        for r in rows:
            texts.append(tuple(str(r.get(c, "")) for c in task.text_columns))
            raw.append(str(r.get(task.label_column, "")))
    else:
        if header is not None:
            missing = [c for c in task.text_columns + (task.label_column,) if c not in header]
            if missing:
                raise UsageError(f"{path} has no column {missing[0]!r} (columns: {', '.join(header)})")
            idx = [header.index(c) for c in task.text_columns] + [header.index(task.label_column)]
        else:
            idx = list(task.positions or range(len(task.text_columns) + 1))
        for lineno, r in enumerate(rows, 2 if header else 1):
            if len(r) <= max(idx):
                raise UsageError(f"{path}:{lineno}: expected at least {max(idx) + 1} columns, found {len(r)}")
            texts.append(tuple(r[i] for i in idx[:-1]))
            raw.append(r[idx[-1]].strip())
    if limit is not None:
        texts, raw = texts[:limit], raw[:limit]
    if not texts:
        raise UsageError(f"{path} has no examples")
    if task.labels is None and task.name != "custom":
        try:
            labels = [float(x) for x in raw]
        except ValueError:
            raise UsageError(f"{path}: label column {task.label_column!r} must be numeric for {task.name}") from None
        names = None
    else:
        names = task.labels or tuple(sorted(set(raw), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s)))
        index = {n: i for i, n in enumerate(names)}
        bad = sorted(set(raw) - set(index))
        if bad:
            raise UsageError(f"{path}: unknown label {bad[0]!r} for task {task.name} (expected one of {', '.join(names)})")
        labels = [index[x] for x in raw]
        if task.labels is None:
            task = Task(task.name, task.text_columns, task.label_column, names, task.metrics)
    return TextData(task, texts, labels, path, names, raw)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass
class ImageData:
    files: list[Path]
    labels: list[int]
    classes: list[str]
    path: Path

    def __len__(self) -> int:
        return len(self.files)


def is_image_folder(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(p.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.iterdir()) for p in path.iterdir())


def load_images(path: Path, split: str | None = None) -> ImageData:
    """An image folder: ROOT/[split/]CLASS/*.png; classes in sorted order."""
    root = Path(path)
    if not root.exists():
        raise UsageError(f"data {root} not found")
    if split and (root / split).is_dir():
        root = root / split
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(i)
    if not files:
        raise UsageError(f"{root} has no images (expected ROOT/CLASS/*.png)")
    return ImageData(files, labels, classes, root)


def check_images(files: Sequence[Path]) -> None:
    """Every file opens as an image and passes PIL's integrity check (header and, for PNG, the
    chunk checksums): a file that cannot be decoded is found before a run writes anything."""
    from PIL import Image, UnidentifiedImageError

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            raise UsageError(f"cannot decode image {f}: not an image file, or a damaged one") from None


def image_tensor(files: Sequence[Path], size: tuple[int, int], mean, std):
    """Decode with PIL, resize, normalise: a float tensor (B, 3, H, W)."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    arrs = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
                arrs.append(np.asarray(im, dtype=np.float32) / 255.0)
        except (OSError, UnidentifiedImageError):
            raise UsageError(f"cannot decode image {f}") from None
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------
# Tokenization (once, cached) and batching for training
# ----------------------------------------------------------------------------------------------
TOKEN_CACHE_VERSION = "1"


@dataclass
class Encoded:
    """Token ids per example (lists of ints) with token-type ids, and labels."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]


def cache_root() -> Path:
    import os

    return Path(os.environ.get("TDKD_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tdkd"))


def _cache_dir() -> Path:
    return cache_root() / "tokens"


def _cache_key(text: TextData, tokenizer_dir: Path | None, max_length: int) -> str | None:
    import hashlib

    if tokenizer_dir is None:
        return None
    h = hashlib.sha256()
    h.update(f"v{TOKEN_CACHE_VERSION}|{max_length}|{text.task.name}|{'/'.join(text.task.text_columns)}|{len(text)}".encode())
    for item in text.texts:
        h.update("\x1f".join(item).encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    h.update(repr(text.labels).encode())
    for name in sorted(p.name for p in Path(tokenizer_dir).iterdir() if p.is_file() and p.name != "model.safetensors"
                       and (p.name.startswith(("tokenizer", "vocab", "special_tokens", "merges", "added_tokens", "spiece", "sentencepiece")))):
        h.update(name.encode())
        h.update((Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()[:32]


def encode(text: TextData, tokenizer, max_length: int, tokenizer_dir: Path | None = None, use_cache: bool = True,
           note: Callable[[str], None] | None = None) -> Encoded:
    """Tokenize every example once; reuse a cached result (safetensors, keyed by the examples, the
    tokenizer files and max_length, checked by io/caches.py) when one exists and is whole; a damaged
    one is reported to ``note`` and rebuilt."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    key = _cache_key(text, tokenizer_dir, max_length) if use_cache else None
    cache = _cache_dir() / f"{key}.safetensors" if key else None
    if cache is not None:
        cached = _read_tokens(cache, key, len(text), note or caches.stderr_note)
        if cached is not None:
            return Encoded(*cached, list(text.labels), pad_id)
    cols = list(zip(*text.texts))
    enc = tokenizer(*[list(c) for c in cols], truncation=True, max_length=max_length)
    input_ids = [list(x) for x in enc["input_ids"]]
    type_ids = [list(x) for x in enc["token_type_ids"]] if "token_type_ids" in enc else None
    if cache is not None:
        _write_tokens(cache, key, input_ids, type_ids)
    return Encoded(input_ids, type_ids, list(text.labels), pad_id)


def _read_tokens(cache: Path, key: str, n: int, note: Callable[[str], None]):
    t, why = caches.read(cache, "tokens", key)
    if t is not None and ("ids" not in t or "offsets" not in t or t["offsets"].numel() != n + 1):
        t, why = None, f"holds {t['offsets'].numel() - 1 if 'offsets' in t else 0} examples, the data has {n}"
    if t is None:
        if why:
            note(f"token cache {cache}: {why}; tokenizing again")
            caches.discard(cache)
        return None
    offsets, ids = t["offsets"].tolist(), t["ids"].tolist()
    types = t["types"].tolist() if "types" in t else None
    input_ids = [ids[offsets[i]:offsets[i + 1]] for i in range(n)]
    type_ids = [types[offsets[i]:offsets[i + 1]] for i in range(n)] if types is not None else None
    return input_ids, type_ids


def _write_tokens(cache: Path, key: str, input_ids: list, type_ids: list | None) -> None:
    import torch

    offsets = [0]
    for x in input_ids:
        offsets.append(offsets[-1] + len(x))
    tensors = {"ids": torch.tensor([v for x in input_ids for v in x], dtype=torch.int32),
               "offsets": torch.tensor(offsets, dtype=torch.int64)}
    if type_ids is not None:
        tensors["types"] = torch.tensor([v for x in type_ids for v in x], dtype=torch.int8)
    caches.write(cache, tensors, "tokens", key, "token cache")


def collate(enc: Encoded, idx: Sequence[int], device: str = "cpu") -> dict:
    """Pad a batch to its longest member: input_ids, attention_mask, token_type_ids, labels."""
    import torch

    width = max(len(enc.input_ids[i]) for i in idx)
    ids = torch.full((len(idx), width), enc.pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    types = torch.zeros((len(idx), width), dtype=torch.long) if enc.token_type_ids is not None else None
    for r, i in enumerate(idx):
        x = enc.input_ids[i]
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
        if types is not None:
            types[r, :len(x)] = torch.tensor(enc.token_type_ids[i])
    labels = [enc.labels[i] for i in idx]
    lab = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], float) else torch.long)
    out = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}
    if types is not None:
        out["token_type_ids"] = types.to(device)
    return out


def grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 50) -> list[list[int]]:
    """One epoch's batches, deterministic in (seed, epoch): shuffle, sort each window of
    ``group`` batches by length (little padding), cut into batches, shuffle the batch order."""
    import torch

    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * group
    batches = []
    for s in range(0, len(perm), window):
        part = sorted(perm[s:s + window], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[j:j + batch_size] for j in range(0, n, batch_size)]
