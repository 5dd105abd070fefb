"""Reading `tdkd distill` run directories for `tdkd report`: each run's recipe, training and
evaluation records and bond spectra (``RunData``), short labels, and seed groups."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import UsageError
from ..io import checkpoint as ckpt

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

    from ..tensor import mpo

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
