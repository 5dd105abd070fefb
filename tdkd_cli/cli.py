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
    "\b\ntdkd decompose tinybert -o student-mpo  ->  tdkd distill ...  ->  tdkd merge student-mpo -o student  "
    "->  tdkd eval / tdkd bench",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # option texts say "[default]" in brackets: never read them as rich markup
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _examples(*lines: str) -> str:
    """Command epilog: one example per line (a \\b line keeps click from re-wrapping them)."""
    return "\b\nExamples:\n" + "\n".join(f"  {x}" for x in lines)


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
@app.command(epilog=_examples("tdkd decompose tinybert --init random -o tinybert-mpo",
             "tdkd decompose ./my-bert --n 5 --shapes 768=32,1,1,1,24 -o my-bert-mpo --json",
             "tdkd decompose vit_tiny_patch16_224 --weights vit.safetensors -o vit-mpo"))
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
    layers: Optional[str] = typer.Option(None, "--layers", help="Keep only these layers first (cut a student from a deeper model): 0,1,2 | every-other | first-K."),
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
                                     trust_remote_code=trust_remote_code, layers=layers, on_layer=on_layer, on_plan=on_plan)
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


@app.command(epilog=_examples("tdkd merge student-mpo -o student  (then: AutoModelForSequenceClassification.from_pretrained('student'))"))
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


class _DistillReporter:
    """Rich progress bar on a terminal; plain log lines on stderr otherwise (CI logs, pipes)."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.err = _console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.progress = None
        self.bar = None
        self.evals: list[tuple[int, dict, bool]] = []

    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text)

    def start(self, total: int, start_step: int) -> None:
        if self.quiet or not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"), console=self.err)
        self.progress.start()
        self.bar = self.progress.add_task("", total=total, completed=start_step)

    def step(self, step: int, total: int, rec: dict) -> None:
        parts = [f"loss {rec['loss']:.4g}"] + [f"{k} {rec[k]:.4g}" for k in ("kd", "ce", "hidden", "attention", "tensor") if rec[k]]
        text = " ".join(parts) + f" | {rec['examples_per_s']:.1f} ex/s"
        if self.progress is not None:
            self.progress.update(self.bar, completed=step, description=text)
        elif not self.quiet:
            self.err.print(f"step {step}/{total} lr {rec['lr']:.3g} {text}")

    def evaluated(self, step: int, metrics: dict, best: bool) -> None:
        self.evals.append((step, metrics, best))
        if not self.quiet:
            m = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.err.print(f"eval at step {step}: {m}{'  (best so far)' if best else ''}")

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@app.command(epilog=_examples("tdkd distill --recipe sst2-demo -o runs/demo",
             "tdkd distill --teacher teacher/ --student-layers 0,1,2 --data ../shared/data/glue/SST-2 --tensor-lambda 1e-4 -o run",
             "tdkd distill --teacher none --student minilm --data glue/SST-2 -o teacher-run  (fine-tune a teacher)",
             "tdkd distill -o run --resume",
             "torchrun --nproc_per_node=2 -m tdkd_cli distill --recipe R -o run"))
def distill(
    output: Path = typer.Option(..., "-o", "--output", help="Run directory (checkpoints/, best/, metrics.jsonl, recipe.yaml)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML file or built-in name (see `tdkd recipes`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its latest complete checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (and no progress)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher model, or 'none' to fine-tune without one (how teachers and no-KD baselines are made)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student model or `tdkd decompose` output. Default with --student-layers: the teacher."),
    student_layers: Optional[str] = typer.Option(None, "--student-layers", help="Cut the student to these layers: 0,1,2 | every-other | first-K."),
    init: Optional[str] = typer.Option(None, "--init", help="pretrained | random (presets build offline)."),
    student_weights: Optional[str] = typer.Option(None, "--student-weights", help="safetensors weights of a timm student."),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help="safetensors weights of a timm teacher."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory when the models have none."),
    data: Optional[str] = typer.Option(None, "--data", help="Task directory (train/dev .tsv), .tsv/.csv/.jsonl file, image folder, or builtin:sst2-sample."),
    task: Optional[str] = typer.Option(None, "--task", help="sst2 rte mrpc cola stsb qnli qqp mnli (default: from the data path)."),
    text_column: Optional[List[str]] = typer.Option(None, "--text-column", help="Text column of a generic file; repeat for pairs."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label column of a generic file."),
    train_split: Optional[str] = typer.Option(None, "--train-split", help="Training split name [train]."),
    dev_split: Optional[str] = typer.Option(None, "--dev-split", help="Evaluation split name, or 'none' [dev]."),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help="Use only the first N training examples."),
    dev_limit: Optional[int] = typer.Option(None, "--dev-limit", help="Use only the first N dev examples."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Truncate token sequences [128]."),
    mpo: Optional[bool] = typer.Option(None, "--mpo/--no-mpo", help="Train the student over-parameterized in MPO form [mpo]."),
    n: Optional[int] = typer.Option(None, "--n", "--mpo-n", help="MPO cores per matrix for on-the-fly decomposition [5]. Under torchrun write --mpo-n (torchrun's parser takes --n as an abbreviation of its own options)."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help="Glob of Linear layers to decompose; repeatable."),
    shapes: Optional[List[str]] = typer.Option(None, "--shapes", help="Explicit factor shape DIM=F1,..; repeatable."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="KD weight; CE gets 1-alpha [1.0]."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="KD temperature T [1.0]."),
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Teacher layer per student layer for the hidden, attention and tensor losses, e.g. 0,1,2 (default uniform: ceil((i+1)L_T/L_S)-1)."),
    hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help="Hidden-state MSE weight [0]."),
    attention_weight: Optional[float] = typer.Option(None, "--attention-weight", help="Attention-map MSE weight [0]."),
    tensor_lambda: Optional[float] = typer.Option(None, "--tensor-lambda", help="OPDF tensor constraint weight lambda [0]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of dense parameters [5e-5]."),
    mpo_lr: Optional[float] = typer.Option(None, "--mpo-lr", help="Learning rate of MPO cores [= lr]."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay of weight matrices [0.01]."),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help="Warm-up fraction of the steps [0]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per micro-batch per process [32]."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step [1]."),
    epochs: Optional[float] = typer.Option(None, "--epochs", help="Passes over the data [3]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (overrides --epochs)."),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help="Gradient clipping norm, 0 = off [1.0]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed [42]."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps, 0 = at the end [0]."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Full-state checkpoint every N steps, 0 = at the end [0]."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Full-state checkpoints kept [2]."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Log averaged losses every N steps [10]."),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help="Evaluation batch size [64]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda [auto]."),
):
    """Distill a teacher into an over-parameterized (MPO) student: KD + OPDF tensor constraint.

    Loss: alpha*KD(T) + (1-alpha)*CE + hidden_weight*MSE(hidden) + attention_weight*MSE(attn)
    + tensor_lambda * L_aux, where L_aux pulls the student's auxiliary MPO cores towards the
    teacher's (decomposed once with matching factor shapes, frozen). Writes a run directory;
    `tdkd merge OUTPUT/best -o student` gives the deployable dense student."""
    from . import recipe as recipe_mod
    from . import train

    overrides = dict(
        teacher=teacher, student=student, student_layers=student_layers, init=init, student_weights=student_weights,
        teacher_weights=teacher_weights, tokenizer=tokenizer, data=data, task=task, text_columns=text_column or None,
        label_column=label_column, train_split=train_split, dev_split=dev_split, train_limit=train_limit,
        dev_limit=dev_limit, max_length=max_length, mpo=mpo, n=n, targets=targets or None, shapes=shapes or None,
        alpha=alpha, temperature=temperature, layer_map=layer_map, hidden_weight=hidden_weight, attention_weight=attention_weight,
        tensor_lambda=tensor_lambda, lr=lr, mpo_lr=mpo_lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio,
        batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps, max_grad_norm=max_grad_norm,
        seed=seed, eval_every=eval_every, save_every=save_every, keep_last=keep_last, log_every=log_every,
        eval_batch_size=eval_batch_size, device=device,
    )
    explicit = {k for k, v in overrides.items() if v is not None}
    if recipe:
        explicit |= set(recipe_mod.read(recipe))
    r = recipe_mod.resolve(recipe, overrides)
    reporter = _DistillReporter(quiet=as_json)
    report = train.run(r, output, resume=resume, force=force, reporter=reporter, argv=sys.argv[1:], explicit=explicit)
    if report.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        _emit_json(report)
        return
    from rich.table import Table

    t = Table(title=f"distill -> {output}")
    t.add_column("")
    t.add_column("", justify="right")
    best = report["best"]
    rows = [("steps", _fmt_int(report["steps"])), ("processes x device", f"{report['world_size']} x {report['device']}"),
            ("training examples", _fmt_int(report["train_examples"])),
            ("parameters while training", _fmt_int(report["params_training"])),
            ("parameters after merge", _fmt_int(report["params_inference"]))]
    if report["aligned_cores"]:
        rows.append(("aligned auxiliary cores", f"{report['aligned_cores']} (skipped {report['skipped_cores']})"))
    for k, v in (report.get("final_metrics") or {}).items():
        rows.append((f"final dev {k}", f"{v:.4f}"))
    if best.get("value") is not None:
        rows.append((f"best dev {best['metric']}", f"{best['value']:.4f} (step {best['step']})"))
    rows += [("best model", report["best_dir"]), ("last full checkpoint", str(report["checkpoint"]))]
    for a, b in rows:
        t.add_row(a, b)
    _console().print(t)
    _console().print(f"next: tdkd merge {report['best_dir']} -o student && tdkd eval student --data ...")


@app.command(epilog=_examples("tdkd recipes",
             "tdkd recipes sst2-demo  (print)",
             "tdkd recipes sst2-demo --copy my.yaml"))
def recipes(
    name: Optional[str] = typer.Argument(None, help="A built-in recipe to print (or copy with --copy)."),
    copy: Optional[Path] = typer.Option(None, "--copy", help="Copy the recipe to this file for editing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --copy target."),
):
    """List the built-in recipes, print one, or copy one out for editing."""
    from . import checkpoint, recipe as recipe_mod

    if name is None:
        if copy is not None:
            raise _click_exc.UsageError("--copy needs a recipe NAME")
        from rich.table import Table

        t = Table(title=f"built-in recipes ({recipe_mod.builtin_dir()})")
        t.add_column("name")
        t.add_column("description")
        for nm in recipe_mod.builtin_names():
            t.add_row(nm, recipe_mod.describe(recipe_mod.builtin_dir() / f"{nm}.yaml"))
        _console().print(t)
        return
    path = recipe_mod.resolve_path(name)
    recipe_mod.read(str(path))
    text = path.read_text()
    if copy is None:
        sys.stdout.write(text)
        return
    checkpoint.check_output(copy, force)
    checkpoint.atomic_write_text(copy, text)
    _console().print(f"copied {path.name} -> {copy}; run it with: tdkd distill --recipe {copy} -o RUN")


@app.command("eval", epilog=_examples("tdkd eval student --data ../shared/data/glue/SST-2 --task sst2",
             "tdkd eval run/best --data data/rte.jsonl --text-column premise --text-column hypothesis --label-column label --json",
             "tdkd eval vit-merged --data images/ --predictions preds.jsonl"))
def eval_(
    model: str = typer.Argument(..., help="Dense HF/timm directory, MPO checkpoint (decompose/distill output), merged output, or preset."),
    data: str = typer.Option(..., "--data", help="Task directory (with dev.tsv, train.tsv), a .tsv/.csv/.jsonl file, an image folder (CLASS/*.png) for timm models, or builtin:sst2-sample."),
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

    title = f"eval {model} on {report['task']} ({report['split']}, {report['examples']} examples)"
    t = Table(title=title, min_width=min(len(title), 120))
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        t.add_row(k, f"{v:.4f}")
    _console().print(t)
    if predictions:
        _console().print(f"predictions -> {predictions}")


@app.command(epilog=_examples("tdkd bench bert-base tinybert --init random --seq-len 128 --batch-size 8",
             "tdkd bench teacher student-mpo student --json --output bench.json",
             "tdkd bench teacher student --baseline bench-main.json --max-regression 0.10 --gate ratio"))
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
