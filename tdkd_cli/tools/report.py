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

from pathlib import Path

from .runs import RunData, labels, read_run, seed_groups, split_name, trained_spectra
from ..core.errors import UsageError
from ..io import checkpoint as ckpt


def write(paths: list[Path], out: Path, force: bool = False) -> dict:
    """Read the runs, draw the figures and report.md into ``out`` (atomically). Returns a summary."""
    if not paths:
        raise UsageError("no run given: tdkd report RUN [RUN ...] -o DIR")
    runs = [read_run(p, name) for p, name in zip(paths, labels(paths))]
    import matplotlib

    matplotlib.use("Agg")
    from . import report_figures as figs

    with ckpt.atomic_dir(Path(out), force=force, what="report") as tmp:
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
