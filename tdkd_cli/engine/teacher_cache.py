"""Teacher outputs computed once per training example and reused by later epochs.

The teacher of a run is frozen and in eval mode, so for a given example (same tokens, same image
preprocessing) its outputs do not change from one epoch to the next: from the second epoch on a
run needs no teacher forward pass at all. What is kept per example: the logits, and the teacher
features the run's methods read when they have a fixed shape per example (image feature maps,
pooled vectors; token-level text features vary with padding and are not cached, nor are HF hidden
states and attention maps: a run that reads those keeps the teacher forward).

Values: an example's cached outputs are the ones the teacher gave in the batch where the run first
met it; later batches take the cached rows and compute only the rest. So every example's teacher
outputs are a function of the run's own batches, whatever was cached when the run started (a resumed
run reads the same bits). A run without the cache recomputes each epoch's batch, whose other members
and padding differ: the two agree to float rounding (~1e-7 relative), bitwise when batches repeat.

Storage: ``$TDKD_CACHE/teacher-outputs/<key>.safetensors`` (tensors ``logits``, ``feature.<path>``
and the ``filled`` mask), written at every full checkpoint and when the last example is filled,
with tdkd's cache format version, its key and a checksum of its tensors (io/caches.py): a file
that does not match (damaged, truncated, another version or key, rows for another data set) is
reported, deleted and rebuilt from the teacher, never read.
The key hashes the teacher's weights and architecture, the training inputs as fed to it (token ids
after tokenization and truncation to max_length; image files and their resize/normalisation), the
batch plan (seed, batch size), the cached feature paths and the precision, so changed inputs never
read stale outputs, and runs that share all of them (e.g. the arms of an experiment) share one file.
Size: N x (C + sum of cached feature elements per example) x bytes per value (4 in float32) + N bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..io import caches
from ..io import checkpoint as ckpt
from ..methods.loss_terms import Outputs

FORMAT = "tdkd-teacher-outputs/1"


class TeacherCache:
    """Per-example teacher outputs of one run, filled on first sight (see the module docstring)."""

    def __init__(self, n: int, path: Path | None, text: bool, budget_bytes: int):
        self.n, self.path, self.text, self.budget = n, path, text, budget_bytes
        self.filled = torch.zeros(n, dtype=torch.bool)
        self.store: dict[str, torch.Tensor] = {}
        self.off_reason: str | None = None
        self.problem: str | None = None  # why an existing cache file could not be used
        self.dirty = False

    @property
    def on(self) -> bool:
        return self.off_reason is None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.store.values()) + self.n

    def lookup(self, idx: list[int], device) -> Outputs | None:
        """The batch's teacher outputs when every example is cached, else None."""
        if not self.on or not self.store or not bool(self.filled[idx].all()):
            return None
        return self._rows(idx, device)

    def merge(self, idx: list[int], fresh: Outputs) -> Outputs:
        """Store the rows seen for the first time; return the batch's outputs with the rows cached
        earlier taken from the cache (so an example's outputs never change during a run)."""
        if not self.on or (not self.store and not self._allocate(fresh, len(idx))):
            return fresh
        rows = torch.tensor(idx)
        new = ~self.filled[rows]
        if bool(new.any()):
            for name, value in self._named(fresh).items():
                self.store[name][rows[new]] = value.detach()[new.to(value.device)].to("cpu")
            self.filled[rows[new]] = True
            self.dirty = True
        if bool(new.all()):
            return fresh
        return self._rows(idx, fresh.logits.device)

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def save(self) -> None:
        """Write the cache file (atomically) when something new was filled since the last write."""
        if self.path is None or not self.dirty or not self.on:
            return
        tensors = dict(self.store, filled=self.filled.to(torch.uint8))
        caches.write(self.path, tensors, "teacher-outputs", self.path.stem, "teacher cache")
        self.dirty = False

    def load(self) -> int:
        """Read the cache file if it exists and fits this run; returns the examples it holds."""
        if self.path is None:
            return 0
        tensors, why = caches.read(self.path, "teacher-outputs", self.path.stem)
        if tensors is not None:
            filled = tensors.pop("filled", None)
            if filled is None or tuple(filled.shape) != (self.n,) or "logits" not in tensors or \
                    any(t.dim() < 1 or t.shape[0] != self.n for t in tensors.values()):
                tensors, why = None, f"its rows do not fit this run's {self.n} examples"
        if tensors is None:
            if why:
                self.problem = why
                caches.discard(self.path)
            return 0
        self.store, self.filled = tensors, filled.to(torch.bool)
        return int(self.filled.sum())

    # -- internals --------------------------------------------------------------------------------
    def _named(self, out: Outputs) -> dict[str, torch.Tensor]:
        named = {"logits": out.logits}
        named.update({f"feature.{path}": value for path, value in out.features.items()})
        return named

    def _rows(self, idx: list[int], device) -> Outputs:
        rows = torch.tensor(idx)
        feats = {name[len("feature."):]: t[rows].to(device) for name, t in self.store.items() if name.startswith("feature.")}
        return Outputs(self.store["logits"][rows].to(device), features=feats)

    def _allocate(self, first: Outputs, batch: int) -> bool:
        """Decide from the first batch whether its outputs can be cached, and allocate the store."""
        if first.hidden is not None or first.attentions is not None:
            return self._off("the run reads the teacher's hidden states or attention maps")
        named = self._named(first)
        for name, value in named.items():
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != batch:
                return self._off(f"teacher output {name} is not one tensor row per example")
            if self.text and value.dim() > 2:
                return self._off(f"teacher feature {name[len('feature.'):]} has a token axis (its shape follows the padding)")
        need = sum(self.n * v[0].numel() * v.element_size() for v in named.values()) + self.n
        if need > self.budget:
            return self._off(f"it would take {need / 2**20:.0f} MiB, above teacher_cache_mb")
        self.store = {name: torch.zeros((self.n,) + tuple(v.shape[1:]), dtype=v.dtype) for name, v in named.items()}
        return True

    def _off(self, reason: str) -> bool:
        self.off_reason = reason
        self.store = {}
        return False


def tensor_digest(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes (sorted by name)."""
    return caches.digest(state)


def cache_key(teacher, teacher_source: dict, inputs_digest: str, extra: dict) -> str:
    """The file name's key (see the module docstring)."""
    h = hashlib.sha256()
    for part in (FORMAT, tensor_digest(teacher.state_dict()), json.dumps(teacher_source, sort_keys=True, default=str),
                 inputs_digest, json.dumps(extra, sort_keys=True, default=str)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


def text_digest(enc) -> str:
    """Digest of tokenized training inputs (token ids and token types per example)."""
    h = hashlib.sha256()
    h.update(json.dumps([enc.input_ids, enc.token_type_ids]).encode())
    return h.hexdigest()


def image_digest(files, norm) -> str:
    """Digest of image files (their bytes, in order) and the resize/normalisation applied."""
    h = hashlib.sha256(json.dumps(norm, default=list).encode())
    for f in files:
        h.update(ckpt.sha256_file(Path(f)).encode())
    return h.hexdigest()


def cache_dir() -> Path:
    from ..io.data import cache_root

    return cache_root() / "teacher-outputs"


def setup(r, pair, ds, batches, world: int, t_paths: list[str], needs: frozenset, reporter) -> TeacherCache | None:
    """The run's cache (None when the run has no teacher forward to save, or the cache is off)."""
    if pair.teacher is None or "teacher" not in needs or ds.kind == "graph":  # a graph: one cheap full-graph forward
        return None
    if not r.teacher_cache:
        reporter.info("teacher cache: off (teacher_cache: false): the teacher runs on every batch")
        return None
    if "hidden" in needs or "attentions" in needs:
        reporter.info("teacher cache: off (the run reads the teacher's hidden states or attention maps)")
        return None
    text = ds.kind == "text"
    path = None
    if world == 1:  # under torchrun each process keeps its own examples in memory only
        from ..io.models import image_norm

        digest = text_digest(batches.enc_train) if text else image_digest(ds.train.files, image_norm(pair.student.model))
        source = {k: v for k, v in pair.teacher.source.items() if k != "spec"}
        key = cache_key(pair.teacher.model, source, digest, {"n": batches.n_train, "seed": r.seed, "batch_size": r.batch_size,
                                                              "features": list(t_paths), "precision": r.precision})
        path = cache_dir() / f"{key}.safetensors"
    cache = TeacherCache(batches.n_train, path, text, r.teacher_cache_mb * 2**20)
    held = cache.load()
    if cache.problem:
        reporter.info(f"teacher cache {path}: {cache.problem}; rebuilding it from the teacher")
    where = f" ({path})" if path else ""
    reporter.info(f"teacher cache: on, {held} of {batches.n_train} examples cached{where}")
    return cache
