"""Node-classification graphs: ``builtin:cora`` / ``builtin:citeseer`` (shipped), a pickle-free
``.npz`` file, or a directory of two tables (CSV or Parquet) a user can write from any tool.

``.npz`` (``numpy.load(path, allow_pickle=False)``): ``x`` (N x F numbers), ``y`` (N integers, -1
for an unlabeled node), ``edge_index`` (2 x E node numbers), ``train_idx``, ``val_idx``,
``test_idx`` (node numbers; the public Planetoid split for the shipped files).

Table form, a directory holding ``nodes.csv`` and ``edges.csv`` (or ``nodes.parquet`` and
``edges.parquet``, read with pyarrow; one of each, either format):
  nodes.csv  columns ``id`` (optional; default the row number), ``label`` (a class number or name;
             empty: unlabeled), ``split`` (train, val or test; empty: none) and the features, every
             other column (numbers).
  edges.csv  columns ``source``, ``target`` (node ids).

Every form is checked (one line naming the problem): arrays present and numeric, edges naming
existing nodes, disjoint splits, labels -1 or 0..C-1 with every split node labeled. Features are
row-normalised (each node's features sum to 1, as Kipf & Welling and PyG's NormalizeFeatures do);
edges are used in both directions, self-loops and repeated edges dropped. Training is full-graph: a graph too large for that is
refused (neighbour samplers need pyg-lib, which tdkd does not use).
"""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError

BUILTIN_GRAPHS = ("cora", "citeseer")
ARRAYS = ("x", "y", "edge_index", "train_idx", "val_idx", "test_idx")
SPLITS = ("train", "val", "test")
# full-graph training keeps every feature and activation in memory: refuse beyond these
MAX_FEATURE_ELEMENTS = 500_000_000
MAX_EDGES = 200_000_000


@dataclass
class Graph:
    """A checked graph: features (N x F float32, row-normalised), labels (N, -1 unlabeled), both
    directions of every edge (2 x E), node numbers of each split, the number of classes."""

    x: object
    y: object
    edge_index: object
    splits: dict  # "train" | "val" | "test" -> long tensor of node numbers
    num_classes: int
    path: Path
    label_names: list | None = None

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def nonzero(self):
        """(rows, cols) of the nonzero features, computed once."""
        if getattr(self, "_nonzero", None) is None:
            self._nonzero = self.x.nonzero(as_tuple=True)
        return self._nonzero

    def edges_without(self, split: str):
        """Edges touching no node of ``split`` (the inductive training graph hides the test nodes')."""
        import torch

        hidden = torch.zeros(self.num_nodes, dtype=torch.bool)
        hidden[self.splits[split]] = True
        keep = ~(hidden[self.edge_index[0]] | hidden[self.edge_index[1]])
        return self.edge_index[:, keep]


def builtin_path(name: str) -> Path:
    return Path(__file__).resolve().parent.parent / "data" / "graphs" / f"{name}.npz"


TABLE_SUFFIXES = (".csv", ".parquet")


def _table(directory: Path, stem: str) -> Path | None:
    """``directory/stem.csv`` or ``directory/stem.parquet``, whichever exists (CSV first)."""
    return next((p for p in (directory / f"{stem}{s}" for s in TABLE_SUFFIXES) if p.is_file()), None)


def is_graph_data(spec: str | None) -> bool:
    """Whether a --data value names a graph (builtin graph, .npz file, a directory with a nodes and
    an edges table)."""
    if not spec:
        return False
    s = str(spec)
    if s.startswith("builtin:"):
        return s.split(":", 1)[1] in BUILTIN_GRAPHS
    p = Path(s).expanduser()
    return s.lower().endswith(".npz") or (p.is_dir() and _table(p, "nodes") is not None and _table(p, "edges") is not None)


def load(spec: str) -> Graph:
    """The graph a --data value names, checked and ready for full-graph training."""
    s = str(spec)
    path = builtin_path(s.split(":", 1)[1]) if s.startswith("builtin:") else Path(s).expanduser()
    if not path.exists():
        raise UsageError(f"data {path} not found")
    arrays, names = (_read_npz(path) if path.is_file() else _read_text(path))
    return _check(arrays, path, names)


def _read_npz(path: Path) -> tuple[dict, None]:
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ARRAYS if k not in f.files]
            if missing:
                raise UsageError(f"{path}: missing array {missing[0]!r} (a graph .npz holds {', '.join(ARRAYS)})")
            arrays = {k: f[k] for k in ARRAYS}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise UsageError(f"{path}: holds object arrays (pickled Python objects); tdkd reads numeric arrays only") from None
        raise UsageError(f"{path} is not a valid .npz file: {str(exc).splitlines()[0]}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise UsageError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise UsageError(f"{path}: array {k!r} has dtype {a.dtype}; expected numbers")
    return arrays, None


def _read_csv(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"cannot read {path}: {type(exc).__name__}") from None


def _read_parquet(path: Path) -> list[dict]:
    """A Parquet table's rows as CSV would give them: every value a string, a null empty."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pyarrow.ArrowException) as exc:
        raise UsageError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    columns = {name: [_cell(v) for v in table.column(name).to_pylist()] for name in table.column_names}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _cell(v) -> str:
    """A Parquet value as CSV text: null -> empty, a whole float -> an integer (a label column a
    dataframe stored as float because of its nulls stays a class number), else str()."""
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _read_rows(directory: Path, stem: str) -> tuple[Path, list[dict]]:
    path = _table(directory, stem)
    if path is None:
        raise UsageError(f"{directory} has no {stem}.csv or {stem}.parquet")
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_csv(path)
    if not rows:
        raise UsageError(f"{path} has no rows")
    return path, rows


def _read_text(path: Path) -> tuple[dict, list | None]:
    import numpy as np

    (nodes_path, nodes), (edges_path, edges) = _read_rows(path, "nodes"), _read_rows(path, "edges")
    cols = list(nodes[0])
    for need in ("label", "split"):
        if need not in cols:
            raise UsageError(f"{nodes_path} has no column {need!r} (columns: {', '.join(cols)})")
    feats = [c for c in cols if c not in ("id", "label", "split")]
    if not feats:
        raise UsageError(f"{nodes_path} has no feature columns besides id, label and split")
    ids = [row["id"] if "id" in row else str(i) for i, row in enumerate(nodes)]
    index = {v: i for i, v in enumerate(ids)}
    if len(index) != len(ids):
        raise UsageError(f"{nodes_path}: node id {next(v for v in ids if ids.count(v) > 1)!r} appears twice")
    try:
        x = np.array([[float(row[c]) for c in feats] for row in nodes], dtype=np.float32)
    except (TypeError, ValueError):
        raise UsageError(f"{nodes_path}: feature columns must hold numbers") from None
    y, names = _text_labels([row["label"] or "" for row in nodes])
    if "source" not in edges[0] or "target" not in edges[0]:
        raise UsageError(f"{edges_path} needs columns 'source' and 'target' (columns: {', '.join(edges[0])})")
    ei = []
    for row in edges:
        for end in ("source", "target"):
            if row[end] not in index:
                raise UsageError(f"{edges_path}: edge {row['source']} -> {row['target']} names node {row[end]!r}, "
                                 "which is not in the nodes table")
        ei.append((index[row["source"]], index[row["target"]]))
    split = [(row["split"] or "").strip().lower() for row in nodes]
    bad = sorted({s for s in split if s and s not in SPLITS})
    if bad:
        raise UsageError(f"{nodes_path}: unknown split {bad[0]!r} (expected train, val, test or empty)")
    arrays = {"x": x, "y": y, "edge_index": np.array(ei, dtype=np.int64).T.reshape(2, -1)}
    for s in SPLITS:
        arrays[f"{s}_idx"] = np.array([i for i, v in enumerate(split) if v == s], dtype=np.int64)
    return arrays, names


def _text_labels(values: list[str]):
    """Class numbers (all labels integers) or sorted class names -> (y, names or None)."""
    import numpy as np

    given = [v.strip() for v in values]
    present = sorted({v for v in given if v})
    if all(v.lstrip("-").isdigit() for v in present):
        return np.array([int(v) if v else -1 for v in given], dtype=np.int64), None
    code = {v: i for i, v in enumerate(present)}
    return np.array([code[v] if v else -1 for v in given], dtype=np.int64), present


def _check(a: dict, path: Path, names: list | None) -> Graph:
    import torch

    x, y, ei = a["x"], a["y"], a["edge_index"]
    if x.ndim != 2 or x.shape[0] < 1:
        raise UsageError(f"{path}: x must be a nodes x features array (got shape {list(x.shape)})")
    n = x.shape[0]
    if y.shape != (n,) or y.dtype.kind not in "iu":
        raise UsageError(f"{path}: y must hold one integer label per node ({n}); got {y.dtype} {list(y.shape)}")
    if ei.ndim != 2 or ei.shape[0] != 2 or ei.dtype.kind not in "iu":
        raise UsageError(f"{path}: edge_index must be a 2 x E integer array (got {ei.dtype} {list(ei.shape)})")
    if x.size > MAX_FEATURE_ELEMENTS or ei.shape[1] > MAX_EDGES:
        raise UsageError(f"{path}: {n} nodes x {x.shape[1]} features and {ei.shape[1]} edges are too large for full-graph "
                         "training (neighbour sampling needs pyg-lib, which tdkd does not use)")
    if ei.size and (ei.min() < 0 or ei.max() >= n):
        bad = int(ei.max()) if ei.max() >= n else int(ei.min())
        raise UsageError(f"{path}: edge_index names node {bad}, but the graph has nodes 0..{n - 1}")
    splits = _check_splits(a, path, n)
    if (y < -1).any():
        raise UsageError(f"{path}: label {int(y.min())} is out of range (labels are 0..C-1, or -1 for unlabeled)")
    num_classes = int(y.max()) + 1
    if num_classes < 2:
        raise UsageError(f"{path}: the labels name fewer than two classes")
    for s, idx in splits.items():
        if (y[idx] < 0).any():
            raise UsageError(f"{path}: {s} node {int(idx[y[idx] < 0][0])} has no label (-1)")
    xt = torch.tensor(x, dtype=torch.float32)
    if not torch.isfinite(xt).all():
        raise UsageError(f"{path}: x holds NaN or infinite values")
    xt = xt / xt.sum(1, keepdim=True).clamp(min=1e-12) if (xt >= 0).all() else xt
    return Graph(xt, torch.tensor(y, dtype=torch.long), _clean_edges(torch.tensor(ei, dtype=torch.long), n),
                 {s: torch.tensor(i, dtype=torch.long) for s, i in splits.items()}, num_classes, path, names)


def _check_splits(a: dict, path: Path, n: int) -> dict:
    import numpy as np

    splits = {}
    for s in SPLITS:
        idx = a[f"{s}_idx"]
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise UsageError(f"{path}: {s}_idx must be a 1-D integer array")
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise UsageError(f"{path}: {s}_idx names node {int(idx.max() if idx.max() >= n else idx.min())}, "
                             f"but the graph has nodes 0..{n - 1}")
        if len(np.unique(idx)) != len(idx):
            raise UsageError(f"{path}: {s}_idx lists a node twice")
        splits[s] = idx.astype(np.int64)
    if not len(splits["train"]):
        raise UsageError(f"{path}: the train split is empty")
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1:]:
            both = np.intersect1d(splits[s], splits[t])
            if both.size:
                raise UsageError(f"{path}: the {s} and {t} splits overlap (node {int(both[0])} is in both)")
    return splits


def _clean_edges(ei, n: int):
    """Both directions of every edge, self-loops and repeated edges dropped, sorted by source."""
    import torch

    ei = torch.cat([ei, ei.flip(0)], 1)
    ei = ei[:, ei[0] != ei[1]]
    key = torch.unique(ei[0] * n + ei[1])
    return torch.stack([key // n, key % n])
