"""`tdkd report`: figures of finished (or running) `tdkd distill` runs, and a report.md embedding them.

Reads each run directory (metrics.jsonl, recipe.yaml, spectra-init.json, best/ or the last
checkpoint) and writes into the output directory:

    losses.png    every logged loss term and the learning rate by step, runs overlaid
    dev.png       the dev metric by step; runs that differ only by their seed are drawn as one
                  group (mean line, min..max band), the others one line each
    spectra.png   MPO students: singular values at the bonds of a few layers, at initialisation
                  (spectra-init.json, written when the run started) and in the trained model
    report.md     a table of the runs (description, steps, best and final dev metric, parameters)
                  and the figures

matplotlib draws them (Agg backend, no display needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import checkpoint as ckpt
from .errors import UsageError

SKIP_KEYS = {"step", "epoch", "lr", "grad_norm", "examples_per_s"}


@dataclass
class RunData:
    path: Path
    label: str
    recipe: dict
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    spectra_init: dict = field(default_factory=dict)

    @property
    def metric(self) -> str | None:
        return next(iter(self.evals[-1]["eval"]), None) if self.evals else None

    @property
    def split(self) -> str:
        """The split the run evaluated on (recipe dev_split: 'dev', or e.g. a held-out slice)."""
        return str(self.recipe.get("dev_split") or "dev")


def split_name(runs: list[RunData]) -> str:
    """The evaluation split the runs share, for labels ('eval' when they differ)."""
    names = {r.split for r in runs}
    return names.pop() if len(names) == 1 else "eval"


def read_run(path: Path, label: str) -> RunData:
    """One run directory's records; a directory that is not a run is a UsageError."""
    import yaml

    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{path} is not a tdkd distill run (no metrics.jsonl)")
    run = RunData(path, label, {})
    try:
        recipe_file = path / "recipe.yaml"
        run.recipe = (yaml.safe_load(recipe_file.read_text()) or {}) if recipe_file.is_file() else {}
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            (run.evals if "eval" in rec else run.train).append(rec)
        spectra = path / "spectra-init.json"
        if spectra.is_file():
            run.spectra_init = json.loads(spectra.read_text()).get("layers", {})
    except (OSError, ValueError, yaml.YAMLError, AttributeError) as exc:
        raise UsageError(f"cannot read run {path}: {type(exc).__name__}") from None
    if not isinstance(run.recipe, dict):
        raise UsageError(f"cannot read run {path}: recipe.yaml is not a mapping")
    return run


def labels(paths: list[Path]) -> list[str]:
    """Short unique names: the directory names, with parents added until they differ."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def seed_groups(runs: list[RunData]) -> list[list[RunData]]:
    """Runs whose recipes are equal but for the seed, in order of first appearance."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        key = json.dumps({k: v for k, v in run.recipe.items() if k != "seed"}, sort_keys=True, default=str)
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def trained_spectra(run: RunData) -> dict[str, list]:
    """Bond singular values of the recorded layers in the run's best model (else its last checkpoint)."""
    import torch
    from safetensors import safe_open

    from . import mpo

    cands = [run.path / "best"] + sorted((run.path / "checkpoints").glob("step-*"), reverse=True)
    src = next((d / ckpt.TENSORS for d in cands if (d / ckpt.TENSORS).is_file()), None)
    if src is None or not run.spectra_init:
        return {}
    out = {}
    with safe_open(str(src), framework="pt") as f:
        keys = set(f.keys())
        for name in run.spectra_init:
            core_keys = sorted((k for k in keys if k.startswith(f"{name}.mpo_core.")), key=lambda k: int(k.rsplit(".", 1)[1]))
            if core_keys:
                cores = [f.get_tensor(k).to(torch.float64) for k in core_keys]
                out[name] = [sv.tolist() for sv in mpo.bond_spectra(cores)]
    return out


def write(paths: list[Path], out: Path, force: bool = False) -> dict:
    """Read the runs, draw the figures and report.md into ``out`` (atomically). Returns a summary."""
    if not paths:
        raise UsageError("no run given: tdkd report RUN [RUN ...] -o DIR")
    runs = [read_run(p, name) for p, name in zip(paths, labels(paths))]
    import matplotlib

    matplotlib.use("Agg")
    from . import report_figures as figs

    with ckpt.atomic_dir(Path(out), force=force) as tmp:
        written = [figs.losses(runs, tmp / "losses.png")]
        if any(r.evals for r in runs):
            written.append(figs.dev(runs, seed_groups(runs), tmp / "dev.png"))
        groups = seed_groups(runs)  # one run per group of seeds: the spectra of seeds look alike
        spectra = {g[0].label: (g[0].spectra_init, trained_spectra(g[0])) for g in groups if g[0].spectra_init}
        if spectra:
            written.append(figs.spectra(spectra, tmp / "spectra.png"))
        (tmp / "report.md").write_text(markdown(runs, [Path(w).name for w in written]))
    return {"output": str(out), "runs": [r.label for r in runs], "figures": [Path(w).name for w in written]}


def markdown(runs: list[RunData], figures: list[str]) -> str:
    split = split_name(runs)
    lines = ["# tdkd report", "", f"| run | description | steps | best {split} | final {split} |", "|---|---|---|---|---|"]
    for r in runs:
        metric = r.metric
        values = [e["eval"].get(metric) for e in r.evals] if metric else []
        best = f"{metric} {max(values):.4f}" if values else "-"
        final = f"{metric} {values[-1]:.4f}" if values else "-"
        steps = r.train[-1]["step"] if r.train else 0
        desc = str(r.recipe.get("description") or "").replace("|", "/")
        lines.append(f"| {r.label} | {desc} | {steps} | {best} | {final} |")
    captions = {"losses.png": "Loss terms and learning rate by step.",
                "dev.png": f"Metric on the {split} split by step (runs differing only by seed: mean, min..max band).",
                "spectra.png": "Singular values at the MPO bonds, at initialisation and after training."}
    lines.append("")
    for f in figures:
        lines += [f"![{captions[f]}]({f})", "", captions[f], ""]
    return "\n".join(lines)
