"""The figures of `tdkd report` (matplotlib, Agg backend): one function per PNG, each taking the
runs read by runs.py and the file to write."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt

from .runs import SKIP_KEYS, RunData, split_name


def _terms(runs: list[RunData]) -> list[str]:
    """Logged terms that are non-zero somewhere, in first-seen order (loss first)."""
    keys: list[str] = []
    for r in runs:
        for rec in r.train:
            for k, v in rec.items():
                if k not in SKIP_KEYS and k not in keys and isinstance(v, (int, float)) and v != 0:
                    keys.append(k)
    return keys


def losses(runs: list[RunData], path: Path) -> Path:
    keys = _terms(runs) + ["lr"]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        values = []
        for i, r in enumerate(runs):
            pts = [(rec["step"], rec[key]) for rec in r.train if isinstance(rec.get(key), (int, float))]
            if pts and any(v != 0 for _, v in pts):  # a run that does not use a term logs zeros: left out
                ax.plot(*zip(*pts), label=r.label, linewidth=1.2, color=f"C{i}")
                values += [v for _, v in pts]
        ax.set_title("learning rate" if key == "lr" else f"{key} (loss term)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("learning rate" if key == "lr" else "value (mean over the logged window)")
        if key != "lr" and values and min(values) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def dev(runs: list[RunData], groups: list[list[RunData]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    metrics = {r.metric for r in runs if r.metric}
    for group in groups:
        metric = group[0].metric
        series = [[(e["step"], e["eval"][metric]) for e in r.evals if metric in e["eval"]] for r in group]
        series = [s for s in series if s]
        if not series:
            continue
        name = group[0].label if len(metrics) == 1 else f"{group[0].label} ({metric})"
        if len(series) == 1:
            ax.plot(*zip(*series[0]), marker="o", markersize=3, label=name)
            continue
        steps = sorted(set.intersection(*(set(x for x, _ in s) for s in series)))
        table = [[dict(s)[x] for s in series] for x in steps]
        mean = [sum(v) / len(v) for v in table]
        line, = ax.plot(steps, mean, marker="o", markersize=3,
                        label=f"{name} + {len(series) - 1} seeds: mean, min..max")
        ax.fill_between(steps, [min(v) for v in table], [max(v) for v in table], color=line.get_color(), alpha=0.2)
    split = split_name(runs)
    label = f"{split} {next(iter(metrics))}" if len(metrics) == 1 else f"{split} metric (each run's own, see legend)"
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(label)
    ax.set_title(f"{label} by step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def spectra(per_run: dict[str, tuple[dict, dict]], path: Path) -> Path:
    """per_run: label -> (layer -> bond spectra at init, layer -> bond spectra trained)."""
    panels = [(label, layer, init, trained.get(layer)) for label, (init_all, trained) in per_run.items()
              for layer, init in init_all.items()]
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, (label, layer, init, trained) in zip(axes.flat, panels):
        for k, sv in enumerate(init):
            line, = ax.semilogy(range(1, len(sv) + 1), [max(v, 1e-12) for v in sv], linestyle="--", linewidth=1,
                                label=f"bond {k + 1}, init")
            if trained and k < len(trained):
                ax.semilogy(range(1, len(trained[k]) + 1), [max(v, 1e-12) for v in trained[k]], color=line.get_color(),
                            linewidth=1.3, label=f"bond {k + 1}, trained")
        ax.set_title(f"{label}: {layer}", fontsize=8)
        ax.set_xlabel("index (descending)")
        ax.set_ylabel("singular value")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
