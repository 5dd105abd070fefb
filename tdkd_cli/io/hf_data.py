"""Text data in Hugging Face `datasets` form, read offline: a `save_to_disk` directory (a
DatasetDict of splits, or a single Dataset), and parquet or arrow files (one per split, e.g.
train.parquet and validation.parquet, or a single file used for any split).

Rows come back as dicts, as for a JSONL file; a ClassLabel column gives its label names (the
integer ids are mapped to them, in the ClassLabel's order). The split `dev` falls back to
`validation`, the name HF data sets use. Nothing is downloaded and nothing is written to the
datasets cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core.errors import UsageError

SUFFIXES = (".parquet", ".arrow")
# GLUE text columns by the names HF's glue data sets use (a task is guessed from them when no
# --task or --text-column is given)
GLUE_TEXT_COLUMNS = (("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                     ("premise", "hypothesis"), ("sentence",))


def is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def is_hf(path: Path) -> bool:
    return is_hf_dataset_dir(path) or path.suffix.lower() in SUFFIXES


def split_file(data: Path, split: str) -> Path | None:
    """train.parquet / validation.arrow ... in a directory of per-split files."""
    names = [split] + (["validation"] if split == "dev" else [])
    for name in names:
        for suffix in SUFFIXES:
            if (data / f"{name}{suffix}").is_file():
                return data / f"{name}{suffix}"
    return None


def read(path: Path, split: str) -> tuple[list[dict], dict[str, list[str]]]:
    """(rows, ClassLabel names by column) of one split."""
    path = Path(path)
    try:
        if is_hf_dataset_dir(path):
            return _from_disk(path, split)
        return _from_file(path)
    except UsageError:
        raise
    except Exception as exc:  # pyarrow and datasets raise many types for damaged files
        raise UsageError(f"cannot read {path} as a Hugging Face data set: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def guess_columns(columns) -> tuple[str, ...] | None:
    for cols in GLUE_TEXT_COLUMNS:
        if all(c in columns for c in cols):
            return cols
    return None


def _from_disk(path: Path, split: str):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        names = [split] + (["validation"] if split == "dev" else [])
        found = next((n for n in names if n in data), None)
        if found is None:
            raise UsageError(f"{path} has no {split} split (its splits: {', '.join(data)})")
        data = data[found]
    labels = {name: list(f.names) for name, f in data.features.items() if isinstance(f, datasets.ClassLabel)}
    return data.to_list(), labels


def _from_file(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix.lower() == ".parquet":
        table = pq.read_table(str(path))
    else:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    return table.to_pylist(), _class_labels(table.schema.metadata or {})


def _class_labels(metadata: dict) -> dict[str, list[str]]:
    """ClassLabel names from the features `datasets` stores in an arrow schema's metadata."""
    raw = metadata.get(b"huggingface")
    if not raw:
        return {}
    info = json.loads(raw.decode("utf-8"))
    features = (info.get("info") or {}).get("features") or {}
    return {name: list(f["names"]) for name, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list)}
