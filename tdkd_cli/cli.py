"""The `tdkd` command line: parse options, call the library, render results. No math here.

Heavy libraries (torch, transformers, timm) are imported inside commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

try:  # typer >= 0.20 vendors click; its exceptions are what the parser raises
    from typer._click import exceptions as _click_exc
except ImportError:  # pragma: no cover - older typer on upstream click
    from click import exceptions as _click_exc

from . import __version__
from .errors import TdkdError

app = typer.Typer(
    name="tdkd",
    help="Knowledge distillation with over-parameterized students (MPO tensor decomposition, OPDF).\n\n"
    "A pipeline is a chain of commands, each reading and writing safetensors checkpoints:\n\n"
    "tdkd decompose tinybert -o student-mpo  ->  tdkd distill ...  ->  tdkd merge student-mpo -o student  "
    "->  tdkd eval / tdkd bench",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool):
    if value:
        typer.echo(f"tdkd {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
):
    """Knowledge distillation with over-parameterized students."""


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # In pipes and CI logs rich would assume 80 columns and truncate table cells.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def _fmt_int(x: int) -> str:
    return f"{x:,}"


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def _progress(total_label: str, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(total_label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=_console(stderr=True), transient=True,
                    disable=not enabled)


# ----------------------------------------------------------------------------------------------
@app.command(epilog="Examples:  tdkd decompose tinybert --init random -o tinybert-mpo  |  "
             "tdkd decompose ./my-bert --n 5 --shapes 768=32,1,1,1,24 -o my-bert-mpo --json  |  "
             "tdkd decompose vit_tiny_patch16_224 --weights vit.safetensors -o vit-mpo")
def decompose(
    model: str = typer.Argument(..., help="HF model directory or hub name, timm model name (with --weights), or a preset: bert-base, tinybert, minilm, vit-tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (MPO checkpoint)."),
    n: int = typer.Option(5, "--n", help="Number of MPO cores per matrix (>= 2; the paper uses 5)."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help="Glob on module names of Linear layers to decompose; repeatable. Default per family (BERT: Q,K,V, attention output, FFN in/out; ViT: qkv, proj, fc1, fc2)."),
    shapes: Optional[List[str]] = typer.Option(None, "--shapes", help="Explicit factor shape for a dimension, e.g. 768=8,2,2,2,2,6; repeatable. Default: [a,1,...,1,b] with a*b = dim."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Truncate every bond to at most this dimension (chi). Default: lossless."),
    weights: Optional[str] = typer.Option(None, "--weights", help="safetensors state dict for a timm model."),
    num_labels: Optional[int] = typer.Option(None, "--num-labels", help="Classifier outputs (HF: sequence classification head; timm: num_classes)."),
    init: str = typer.Option("pretrained", "--init", help="pretrained | random (presets build offline from their config)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random initialisation."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow HF models that run code from their repository."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Tensorize a model: replace its Linear weights by lossless MPO cores (over-parameterized).

    Prints per layer the factor shapes, bond dimensions, parameters before/after and the
    reconstruction error, then totals with the over-parameterization ratio."""
    from . import ops

    progress = _progress("decomposing", enabled=not as_json and sys.stderr.isatty())
    with progress:
        task = progress.add_task("", total=None)

        def on_plan(total):
            progress.update(task, total=total)

        def on_layer(plan):
            progress.update(task, advance=1, description=plan.name)

        report = ops.decompose_model(model, output, n=n, targets=targets, shapes=shapes or (), rank=rank, weights=weights,
                                     init=init, num_labels=num_labels, seed=seed, force=force,
                                     trust_remote_code=trust_remote_code, on_layer=on_layer, on_plan=on_plan)
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    t = Table(title=f"decompose {model} -> {output}  (n={n}{'' if rank is None else f', chi={rank}'})")
    for col in ("layer", "weight", "factor shapes (out x in)", "bonds", "params", "MPO params", "x", "rel. error"):
        t.add_column(col, justify="right" if col in ("params", "MPO params", "x", "rel. error") else "left")
    for L in report["layers"]:
        t.add_row(L["name"], f"{L['out_features']}x{L['in_features']}", f"{L['out_shape']} x {L['in_shape']}",
                  ",".join(map(str, L["bonds"][1:-1])), _fmt_int(L["dense_params"]), _fmt_int(L["mpo_params"]),
                  f"{L['mpo_params'] / L['dense_params']:.2f}", f"{L['rel_error']:.1e}")
    tot = report["totals"]
    con = _console()
    con.print(t)
    con.print(f"{tot['layers']} matrices: {_fmt_int(tot['dense_params_targets'])} -> {_fmt_int(tot['mpo_params_targets'])} parameters")
    con.print(f"model: {_fmt_int(tot['model_params_before'])} -> {_fmt_int(tot['model_params_after'])} parameters "
              f"(over-parameterization x{tot['overparam_ratio']:.3f}); max rel. error {tot['max_rel_error']:.1e}; "
              f"probe output max |diff| {tot['output_max_abs_diff']:.1e}")


@app.command(epilog="Example:  tdkd merge student-mpo -o student  (then: AutoModelForSequenceClassification.from_pretrained('student'))")
def merge(
    source: Path = typer.Argument(..., help="MPO checkpoint directory (decompose or distill output)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory: a plain HF model directory, or for timm config.json + model.safetensors."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest accepted output difference, relative to the largest output magnitude."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Contract MPO cores back into dense weights: the original architecture, size and latency.

    Verifies the written checkpoint: reloads it with plain transformers/timm code and compares its
    outputs with the MPO model's on a probe batch; exits 1 (writing nothing) above --tolerance."""
    from . import ops

    report = ops.merge_checkpoint(source, output, tolerance=tolerance, force=force)
    if as_json:
        _emit_json(report)
        return
    con = _console()
    con.print(f"merged {report['layers']} MPO layers: {_fmt_int(report['params_mpo'])} -> {_fmt_int(report['params_merged'])} parameters")
    con.print(f"verification on a probe batch: max |diff| {report['max_abs_diff']:.2e}, relative {report['max_rel_diff']:.2e} "
              f"(tolerance {report['tolerance']:g}) OK -> {report['output']}")


def _not_built(name: str):
    raise TdkdError(f"`tdkd {name}` is not built yet in this version of tdkd")


@app.command(epilog="Example:  tdkd distill --teacher bert-base --student tinybert --data glue/SST-2 -o run")
def distill(args: Optional[List[str]] = typer.Argument(None, hidden=True)):
    """Distill a teacher into an (over-parameterized) student: KD + tensor constraint loss. (not built yet)"""
    _not_built("distill")


@app.command("eval", epilog="Examples:  tdkd eval student --data ../shared/data/glue/SST-2 --task sst2  |  "
             "tdkd eval run/best --data data/rte.jsonl --text-column premise --text-column hypothesis --label-column label --json  |  "
             "tdkd eval vit-merged --data images/ --predictions preds.jsonl")
def eval_(
    model: str = typer.Argument(..., help="Dense HF/timm directory, MPO checkpoint (decompose/distill output), merged output, or preset."),
    data: Path = typer.Option(..., "--data", help="Task directory (with dev.tsv, train.tsv), a .tsv/.csv/.jsonl file, or an image folder (CLASS/*.png) for timm models."),
    task: Optional[str] = typer.Option(None, "--task", help="sst2, rte, mrpc, cola, stsb, qnli, qqp, mnli. Default: guessed from the data path."),
    split: str = typer.Option("dev", "--split", help="Split file to read from a task directory (dev, train, ...)."),
    text_column: Optional[List[str]] = typer.Option(None, "--text-column", help="Text column(s) of a generic file; repeat for sentence pairs."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of a generic file."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory, when the model directory has none."),
    batch_size: int = typer.Option(64, "--batch-size", help="Examples per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate token sequences to this length."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N examples."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write per-example predictions (JSON lines) to this file."),
    init: str = typer.Option("pretrained", "--init", help="pretrained | random (presets)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Task metrics of a model on a data set (accuracy, F1, Matthews, Pearson/Spearman; top-1/top-5 for images)."""
    from . import ops

    progress = _progress("evaluating", enabled=not as_json and sys.stderr.isatty())
    with progress:
        bar = progress.add_task("", total=None)
        report = ops.evaluate_model(
            model, data, task=task, split=split, text_columns=text_column, label_column=label_column, tokenizer=tokenizer,
            batch_size=batch_size, max_length=max_length, device=device, limit=limit, predictions=predictions, init=init,
            on_total=lambda n: progress.update(bar, total=n), on_batch=lambda k: progress.update(bar, advance=k))
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    t = Table(title=f"eval {model} on {report['task']} ({report['split']}, {report['examples']} examples)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        t.add_row(k, f"{v:.4f}")
    _console().print(t)
    if predictions:
        _console().print(f"predictions -> {predictions}")


@app.command(epilog="Examples:  tdkd bench bert-base tinybert --init random --seq-len 128 --batch-size 8  |  "
             "tdkd bench teacher student-mpo student --json --output bench.json  |  "
             "tdkd bench teacher student --baseline bench-main.json --max-regression 0.10 --gate ratio")
def bench(
    models: List[str] = typer.Argument(..., help="Models to time side by side; ratios are against the first."),
    device: str = typer.Option("cpu", "--device", help="cpu | cuda | auto."),
    batch_size: int = typer.Option(8, "--batch-size", help="Inputs per forward pass."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per input (text models)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed calls per model first."),
    iters: int = typer.Option(30, "--iters", help="Timed calls per model (round-robin across models)."),
    init: str = typer.Option("pretrained", "--init", help="pretrained | random (presets build offline)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the JSON report to this file."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Earlier `bench --json` report to compare against."),
    max_regression: float = typer.Option(0.10, "--max-regression", help="Fail (exit 1) when a model is slower than its baseline by more than this fraction."),
    gate: str = typer.Option("latency", "--gate", help="latency (median ms) | ratio (latency relative to the first model; machine independent)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Inference latency (median, p90, p99), throughput, parameters and memory, several models side by side."""
    from . import bench as bench_mod
    from . import checkpoint, ops

    if output is not None:
        checkpoint.check_output(output, force=True)
    base = bench_mod.load_baseline(baseline) if baseline is not None else None
    progress = _progress("benchmarking", enabled=not as_json and sys.stderr.isatty())
    with progress:
        bar = progress.add_task("", total=iters)
        report = ops.bench_models(models, device=device, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                  threads=threads, warmup=warmup, iters=iters, init=init,
                                  on_round=lambda: progress.update(bar, advance=1))
    failed = []
    if base is not None:
        report["regression"] = {"baseline": str(baseline), "max_regression": max_regression, "gate": gate,
                                "models": bench_mod.regression_check(report, base, max_regression, gate)}
        failed = [r for r in report["regression"]["models"] if r["status"] == "regressed"]
        report["regression"]["passed"] = not failed
    if output is not None:
        checkpoint.atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    if as_json:
        _emit_json(report)
    else:
        from rich.table import Table

        st = report["settings"]
        t = Table(title=f"bench on {st['device']} ({report['env']['threads']} threads), batch {st['batch_size']}, "
                        f"seq {st['seq_len']}, {st['dtype']}, {st['iters']} iters")
        for col in ("model", "params", "median ms", "p90 ms", "p99 ms", "items/s", "weights MB", "peak MB", "x latency", "speedup"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for r in report["models"]:
            t.add_row(r["name"], _fmt_int(r["params"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['throughput_per_s']:.1f}", f"{r['weights_mb']:.1f}",
                      "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
                      f"{r['latency_ratio']:.3f}", f"{r['speedup']:.2f}")
        _console().print(t)
        if base is not None:
            for r in report["regression"]["models"]:
                if r["status"] == "no baseline":
                    _console().print(f"{r['name']}: no baseline entry")
                else:
                    _console().print(f"{r['name']}: {r['gate']} {r['baseline']:.4g} -> {r['current']:.4g} ({r['change']:+.1%}) {r['status']}")
    if failed:
        names = ", ".join(f"{r['name']} ({r['change']:+.1%})" for r in failed)
        from .errors import VerificationError

        raise VerificationError(f"performance regression over {max_regression:.0%} against {baseline}: {names}")


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TDKD_DEBUG") == "1"
    if "--debug" in argv:  # accepted anywhere on the line, not only before the subcommand
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="tdkd", standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except _click_exc.ClickException as exc:
        if debug:
            raise
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "tdkd"
        sys.stderr.write(f"error: {exc.format_message()} (see {where} --help)\n")
        sys.exit(exc.exit_code)
    except TdkdError as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(exc.exit_code)
    except MemoryError:
        if debug:
            raise
        sys.stderr.write("error: out of memory\n")
        sys.exit(1)
    except OSError as exc:
        if debug:
            raise
        sys.stderr.write(f"error: {exc.strerror or exc} ({exc.filename})\n" if exc.filename else f"error: {exc}\n")
        sys.exit(1)
    except Exception as exc:  # an internal failure: still one line, with a pointer to --debug
        if debug:
            raise
        sys.stderr.write(f"error: internal error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); rerun with --debug for the traceback\n")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
