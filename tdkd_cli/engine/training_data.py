"""The data of a training run: the train/dev splits (text task, image folder or graph), tokenized
once, and the batches of each epoch (grouped by length for text, deterministic in seed and epoch;
a graph trains full-graph, one step per epoch: graph_batch.py).

``load`` reads the splits; ``prepare`` tokenizes them and plans the steps; ``Batches.batch``
gives the tensors of one micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..io import data as data_mod
from ..io import graphs, models
from . import graph_batch
from .distributed import Dist
from ..core.errors import UsageError
from ..core.recipe import Recipe


@dataclass
class Dataset:
    kind: str  # "text" | "images" | "graph"
    train: Any
    dev: Any
    task: Any = None  # data.Task for text
    classes: list = field(default_factory=list)
    path: Path | None = None

    @property
    def num_labels(self) -> int:
        if self.kind == "graph":
            return self.train.num_classes
        return self.task.num_labels if self.kind == "text" else len(self.classes)

    @property
    def dev_examples(self) -> int:
        if self.dev is None:
            return 0
        return len(self.dev.splits["val"]) if self.kind == "graph" else len(self.dev)

    @property
    def metric(self) -> str:
        if self.kind == "graph":
            return "accuracy"
        return self.task.metrics[0] if self.kind == "text" else "top1"


def load(r: Recipe, note: Callable[[str], None] | None = None) -> Dataset:
    """The train and dev splits named by the recipe (dev None with dev_split 'none'); ``note``
    hears of a damaged cached data set being rebuilt."""
    if graphs.is_graph_data(r.data):  # one graph: train holds it; dev too when it is validated
        g = graphs.load(r.data)
        dev = g if r.dev_split != "none" and len(g.splits["val"]) else None
        return Dataset("graph", g, dev, path=g.path)
    path, builtin_task = data_mod.resolve_data(r.data, note)
    if not path.exists():
        raise UsageError(f"data {path} not found")
    if data_mod.is_image_folder(path) or (path / r.train_split).is_dir() and data_mod.is_image_folder(path / r.train_split):
        return _load_images(r, path)
    task = data_mod.get_task(r.task or builtin_task) if (r.task or builtin_task) else None
    train = data_mod.load_text(path, task, r.train_split, r.text_columns, r.label_column, r.train_limit)
    dev = None
    if r.dev_split != "none":
        dev = data_mod.load_text(_dev_path(r, path), train.task, r.dev_split, r.text_columns, r.label_column, r.dev_limit)
        if train.task.labels is not None and dev.label_names and set(dev.raw_labels) - set(train.task.labels):
            raise UsageError(f"{dev.path}: label {sorted(set(dev.raw_labels) - set(train.task.labels))[0]!r} does not occur in training")
    return Dataset("text", train, dev, train.task, path=path)


def _dev_path(r: Recipe, path: Path) -> Path:
    """Where the dev split is read: ``data`` itself, or ``dev_data`` when given (checked to exist)."""
    if r.dev_data is None:
        return path
    dev_path, _ = data_mod.resolve_data(r.dev_data)
    if not dev_path.exists():
        raise UsageError(f"dev data {dev_path} not found")
    return dev_path


def _load_images(r: Recipe, path: Path) -> Dataset:
    train = data_mod.load_images(path, r.train_split)
    dev = None
    dev_path = _dev_path(r, path)
    if r.dev_data is not None and r.dev_split != "none" and not data_mod.is_image_folder(dev_path / r.dev_split) \
            and not data_mod.is_image_folder(dev_path):
        raise UsageError(f"dev data {dev_path} is not an image folder (expected DIR/{r.dev_split}/CLASS/*.png or DIR/CLASS/*.png)")
    if r.dev_split != "none" and ((dev_path / r.dev_split).is_dir() or r.dev_data is not None):
        dev = data_mod.load_images(dev_path, r.dev_split)
        if dev.classes != train.classes:
            if r.dev_data is None:
                raise UsageError(f"{path}: the {r.dev_split} classes differ from the {r.train_split} classes")
            raise UsageError(f"dev data {dev.path} has other classes than the training data {train.path} "
                             f"({', '.join(dev.classes[:6])} vs {', '.join(train.classes[:6])}): they must be the same folder names")
    if r.train_limit:
        train.files, train.labels = train.files[:r.train_limit], train.labels[:r.train_limit]
    if dev is not None and r.dev_limit:
        dev.files, dev.labels = dev.files[:r.dev_limit], dev.labels[:r.dev_limit]
    data_mod.check_images(train.files + (dev.files if dev is not None else []))
    return Dataset("images", train, dev, None, list(train.classes), path=path)


@dataclass
class Batches:
    """Tokenized splits and the step plan: which examples each micro-batch of each step holds."""

    ds: Dataset
    batch_size: int
    grad_accum: int
    seed: int
    dist: Dist
    enc_train: Any = None  # data.Encoded (text)
    enc_dev: Any = None
    steps_per_epoch: int = 0
    graph_setting: str = "transductive"
    _epoch: tuple = (None, None)
    _graph: dict = field(default_factory=dict)  # device -> the full-graph batch (the same every step)

    @property
    def n_train(self) -> int:
        if self.ds.kind == "graph":
            return len(self.ds.train.splits["train"])
        return len(self.enc_train) if self.enc_train is not None else len(self.ds.train)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.ds.kind == "graph":
            return [graph_batch.loss_nodes(self.ds.train, self.graph_setting)]
        if self.enc_train is not None:
            return data_mod.grouped_batches(self.enc_train.lengths, self.batch_size, self.seed, epoch)
        return data_mod.shuffled_batches(self.n_train, self.batch_size, self.seed, epoch)

    def indices(self, step: int, micro: int) -> list[int]:
        """Examples of micro-batch ``micro`` of optimizer step ``step`` for this process."""
        epoch, j = divmod(step, self.steps_per_epoch)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_batches(epoch))
        return self._epoch[1][(j * self.grad_accum + micro) * self.dist.world + self.dist.rank]

    def batch(self, idx: list[int], model, device: str) -> dict:
        """The model inputs and labels of examples ``idx``, and their ``index`` in the training set
        (methods with a row per example read it: CRD's memory banks)."""
        if self.ds.kind == "graph":  # every step trains on the same loss nodes: built and moved once
            if device not in self._graph:
                self._graph[device] = graph_batch.batch(self.ds.train, idx, self.graph_setting, device)
            return self._graph[device]
        index = torch.tensor(idx, dtype=torch.long, device=device)
        if self.ds.kind == "text":
            return dict(data_mod.collate(self.enc_train, idx, device), index=index)
        size, mean, std = models.image_norm(model)
        x = data_mod.image_tensor([self.ds.train.files[i] for i in idx], size, mean, std)
        y = torch.tensor([self.ds.train.labels[i] for i in idx], dtype=torch.long)
        return {"x": x.to(device), "labels": y.to(device), "index": index}

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        return max_steps or max(1, math.ceil(epochs * self.steps_per_epoch))


def prepare(ds: Dataset, r: Recipe, tok_dir: Path | None, vocab_size: int, dist: Dist,
            note: Callable[[str], None] | None = None) -> Batches:
    """Tokenize the text splits once (cached) and count the optimizer steps of an epoch."""
    b = Batches(ds, r.batch_size, r.grad_accum, r.seed, dist, graph_setting=r.graph_setting)
    if ds.kind == "graph":
        graph_batch.check_run(r, dist.world)
    if ds.kind == "text":
        if tok_dir is None:
            raise UsageError("no tokenizer: neither model directory has tokenizer files; pass --tokenizer DIR")
        tok = models.load_tokenizer(tok_dir)
        if len(tok) > vocab_size:
            raise UsageError(f"tokenizer in {tok_dir} has {len(tok)} tokens but the model's vocabulary has {vocab_size}")
        b.enc_train = data_mod.encode(ds.train, tok, r.max_length, tok_dir, note=note)
        b.enc_dev = data_mod.encode(ds.dev, tok, r.max_length, tok_dir, note=note) if ds.dev is not None else None
    per_step = r.grad_accum * dist.world
    b.steps_per_epoch = len(b.epoch_batches(0)) // per_step
    if b.steps_per_epoch < 1:
        raise UsageError(f"{b.n_train} training examples make fewer than one optimizer step "
                         f"(batch_size {r.batch_size} x grad_accum {r.grad_accum} x {dist.world} processes)")
    return b
