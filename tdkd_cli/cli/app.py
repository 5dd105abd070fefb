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

from ..core.version import __version__
from ..core.errors import TdkdError, UsageError

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


def _key_help(key: str, extra: str = "") -> str:
    """Help of a distill option: the recipe key's own help (recipe.SCHEMA), its default in brackets."""
    from ..core.recipe import SCHEMA

    kind, default, text = SCHEMA[key]
    shown = "" if default is None else f" [{str(default).lower() if kind == 'bool' else default}]"
    return f"{text}{(' ' + extra) if extra else ''}{shown}"


def _plugin_option():
    """--plugin of distill and methods."""
    return typer.Option(None, "--plugin", help="Import a module or .py file first; the methods it registers "
                        "(tdkd_cli.register_method) can be named by --method. Repeatable; also $TDKD_PLUGINS and "
                        "installed packages' 'tdkd.methods' entry points.")


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


# ----------------------------------------------------------------------------------------------
@app.command(epilog=_examples("tdkd decompose tinybert --init random -o tinybert-mpo",
             "tdkd decompose ./my-bert --n 5 --shapes 768=32,1,1,1,24 -o my-bert-mpo --json",
             "tdkd decompose vit_tiny_patch16_224 --weights vit.safetensors -o vit-mpo"))
def decompose(
    model: str = typer.Argument(..., help="HF model directory or hub name, timm model name (with --weights), or a preset: bert-base, tinybert, minilm, vit-tiny."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory (MPO checkpoint)."),
    n: int = typer.Option(5, "--n", help="Number of MPO cores per matrix (>= 2; the paper uses 5)."),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help="Glob on module names of Linear and Conv2d layers to decompose; repeatable. Default per family (BERT: Q,K,V, attention output, FFN in/out; ViT: qkv, proj, fc1, fc2; timm CNNs: every Conv2d and every Linear but the classifier)."),
    shapes: Optional[List[str]] = typer.Option(None, "--shapes", help="Explicit factor shape for a dimension, e.g. 768=8,2,2,2,2,6; repeatable. Default: [a,1,...,1,b] with a*b = dim. For a Conv2d the input side is its channels (the kh*kw window joins the last factor) or the whole in*kh*kw."),
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
    """Tensorize a model: replace its Linear and Conv2d weights by lossless MPO cores (over-parameterized).

    A Conv2d (out, in/groups, kh, kw) is decomposed in its matrix form out x (in/groups*kh*kw),
    the kernel window inside the last input factor; stride, padding, dilation and groups stay.

    Prints per layer the factor shapes, bond dimensions, parameters before/after and the
    reconstruction error, then totals with the over-parameterization ratio."""
    from ..tools import ops
    from . import render

    progress = render.progress("decomposing", enabled=not as_json and sys.stderr.isatty())
    with progress:
        task = progress.add_task("", total=None)
        report = ops.decompose_model(model, output, n=n, targets=targets, shapes=shapes or (), rank=rank, weights=weights,
                                     init=init, num_labels=num_labels, seed=seed, force=force,
                                     trust_remote_code=trust_remote_code, layers=layers,
                                     on_plan=lambda total: progress.update(task, total=total),
                                     on_layer=lambda plan: progress.update(task, advance=1, description=plan.name))
    render.emit_json(report) if as_json else render.decompose_report(report, model, output, n, rank)


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
    from ..tools import ops
    from . import render

    report = ops.merge_checkpoint(source, output, tolerance=tolerance, force=force)
    render.emit_json(report) if as_json else render.merge_report(report)


@app.command(epilog=_examples("tdkd distill --recipe sst2-demo -o runs/demo",
             "tdkd distill --teacher teacher/ --student-layers 0,1,2 --data ../shared/data/glue/SST-2 --tensor-lambda 1e-4 -o run",
             "tdkd distill --teacher none --student minilm --data glue/SST-2 -o teacher-run  (fine-tune a teacher)",
             "tdkd distill -o run --resume",
             "torchrun --nproc_per_node=2 -m tdkd_cli distill --recipe R -o run"))
def distill(
    ctx: typer.Context,
    output: Path = typer.Option(..., "-o", "--output", help="Run directory (checkpoints/, best/, metrics.jsonl, recipe.yaml)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Recipe YAML file or built-in name (see `tdkd recipes`)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUTPUT from its latest complete checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (and no progress)."),
    plugins: Optional[List[str]] = _plugin_option(),
    # every option below is a recipe key (recipe.Recipe) of the same name; its help and default come from there
    teacher: Optional[str] = typer.Option(None, "--teacher", help=_key_help("teacher")),
    student: Optional[str] = typer.Option(None, "--student", help=_key_help("student")),
    student_layers: Optional[str] = typer.Option(None, "--student-layers", help=_key_help("student_layers")),
    init: Optional[str] = typer.Option(None, "--init", help=_key_help("init")),
    student_weights: Optional[str] = typer.Option(None, "--student-weights", help=_key_help("student_weights")),
    teacher_weights: Optional[str] = typer.Option(None, "--teacher-weights", help=_key_help("teacher_weights")),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help=_key_help("tokenizer")),
    data: Optional[str] = typer.Option(None, "--data", help=_key_help("data")),
    task: Optional[str] = typer.Option(None, "--task", help=_key_help("task")),
    text_columns: Optional[List[str]] = typer.Option(None, "--text-column", help=_key_help("text_columns", "Repeat for pairs.")),
    label_column: Optional[str] = typer.Option(None, "--label-column", help=_key_help("label_column")),
    train_split: Optional[str] = typer.Option(None, "--train-split", help=_key_help("train_split")),
    dev_split: Optional[str] = typer.Option(None, "--dev-split", help=_key_help("dev_split")),
    dev_data: Optional[str] = typer.Option(None, "--dev-data", help=_key_help("dev_data")),
    train_limit: Optional[int] = typer.Option(None, "--train-limit", help=_key_help("train_limit")),
    dev_limit: Optional[int] = typer.Option(None, "--dev-limit", help=_key_help("dev_limit")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=_key_help("max_length")),
    graph_setting: Optional[str] = typer.Option(None, "--graph-setting", help=_key_help("graph_setting")),
    mpo: Optional[bool] = typer.Option(None, "--mpo/--no-mpo", help=_key_help("mpo")),
    n: Optional[int] = typer.Option(None, "--n", "--mpo-n", help=_key_help("n", "Under torchrun write --mpo-n (torchrun's parser takes --n as an abbreviation of its own options).")),
    targets: Optional[List[str]] = typer.Option(None, "--targets", help=_key_help("targets", "Repeatable.")),
    shapes: Optional[List[str]] = typer.Option(None, "--shapes", help=_key_help("shapes", "Repeatable: --shapes 768=32,1,1,1,24.")),
    alpha: Optional[float] = typer.Option(None, "--alpha", help=_key_help("alpha")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help=_key_help("temperature")),
    layer_map: Optional[str] = typer.Option(None, "--layer-map", help=_key_help("layer_map")),
    hidden_weight: Optional[float] = typer.Option(None, "--hidden-weight", help=_key_help("hidden_weight")),
    attention_weight: Optional[float] = typer.Option(None, "--attention-weight", help=_key_help("attention_weight")),
    tensor_lambda: Optional[float] = typer.Option(None, "--tensor-lambda", help=_key_help("tensor_lambda")),
    methods: Optional[List[str]] = typer.Option(None, "--method", help=_key_help("methods", "Repeatable.")),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=_key_help("optimizer")),
    lr: Optional[float] = typer.Option(None, "--lr", help=_key_help("lr")),
    mpo_lr: Optional[float] = typer.Option(None, "--mpo-lr", help=_key_help("mpo_lr")),
    connector_lr: Optional[float] = typer.Option(None, "--connector-lr", help=_key_help("connector_lr")),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help=_key_help("weight_decay")),
    warmup_ratio: Optional[float] = typer.Option(None, "--warmup-ratio", help=_key_help("warmup_ratio")),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help=_key_help("lr_schedule")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=_key_help("batch_size")),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help=_key_help("grad_accum")),
    epochs: Optional[float] = typer.Option(None, "--epochs", help=_key_help("epochs")),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help=_key_help("max_steps")),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help=_key_help("max_grad_norm")),
    seed: Optional[int] = typer.Option(None, "--seed", help=_key_help("seed")),
    precision: Optional[str] = typer.Option(None, "--precision", help=_key_help("precision")),
    teacher_cache: Optional[bool] = typer.Option(None, "--teacher-cache/--no-teacher-cache", help=_key_help("teacher_cache")),
    teacher_cache_mb: Optional[int] = typer.Option(None, "--teacher-cache-mb", help=_key_help("teacher_cache_mb")),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help=_key_help("eval_every")),
    save_every: Optional[int] = typer.Option(None, "--save-every", help=_key_help("save_every")),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help=_key_help("keep_last")),
    keep_best_only: Optional[bool] = typer.Option(None, "--keep-best-only/--keep-checkpoints", help=_key_help("keep_best_only")),
    log_every: Optional[int] = typer.Option(None, "--log-every", help=_key_help("log_every")),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", help=_key_help("eval_batch_size")),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard/--no-tensorboard", help=_key_help("tensorboard")),
    device: Optional[str] = typer.Option(None, "--device", help=_key_help("device")),
):
    """Distill a teacher into an over-parameterized (MPO) student: KD + OPDF tensor constraint.

    Loss: alpha*KD(T) + (1-alpha)*CE + hidden_weight*MSE(hidden) + attention_weight*MSE(attn)
    + tensor_lambda * L_aux, where L_aux pulls the student's auxiliary MPO cores towards the
    teacher's (decomposed once with matching factor shapes, frozen). Writes a run directory;
    `tdkd merge OUTPUT/best -o student` gives the deployable dense student. Every option from
    --teacher on is also a recipe key (--grad-accum <-> grad_accum); the command line wins."""
    from ..core import recipe as recipe_mod
    from ..engine import train
    from ..methods import plugins as plugins_mod
    from . import render

    plugins_mod.load_plugins(plugins or ())
    overrides = {k: (v or None) if isinstance(v, (list, tuple)) else v
                 for k, v in ctx.params.items() if k in recipe_mod.SCHEMA}
    r, explicit = recipe_mod.build(recipe, overrides)
    reporter = render.DistillReporter(quiet=as_json)
    report = train.run(r, output, resume=resume, force=force, reporter=reporter, argv=sys.argv[1:], explicit=explicit)
    if report is None:  # not the main process of a torchrun run
        return
    render.emit_json(report) if as_json else render.distill_summary(report, output)


@app.command(epilog=_examples("tdkd synthesize teacher/ --count 2000 --classes builtin:digits -o synth",
             "tdkd distill --teacher teacher/ --student resnet-digits-small --init random --data synth --dev-data builtin:digits -o run",
             "tdkd synthesize teacher/ --student run/best --adaptive-weight 1 --seed 1 -o synth-2  (adaptive round)"))
def synthesize(
    teacher: str = typer.Argument(..., help="Image classifier with BatchNorm layers: a timm/tdkd model directory, MPO checkpoint or preset."),
    output: Path = typer.Option(..., "-o", "--output", help="Output image folder (OUTPUT/train/CLASS/*.png and synthesis.json)."),
    count: int = typer.Option(2000, "--count", help="Images to synthesize (image i has class i mod K)."),
    batch_size: int = typer.Option(100, "--batch-size", help="Images per generator step (their BatchNorm statistics are matched as one batch) and per sampled batch."),
    steps: int = typer.Option(200, "--steps", help="Generator training steps (each one teacher forward and backward pass on a batch)."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate of the generator."),
    ce_weight: float = typer.Option(1.0, "--ce-weight", help="Weight of the teacher's cross-entropy for each image's target class."),
    bn_weight: float = typer.Option(0.3, "--bn-weight", help="Weight of the BatchNorm statistics loss (sum over layers of the L2 distances of batch mean and variance to the running ones)."),
    tv_weight: float = typer.Option(1.0, "--tv-weight", help="Weight of the total-variation prior (mean squared difference of neighbouring pixels)."),
    l2_weight: float = typer.Option(0.0, "--l2-weight", help="Weight of the L2 prior (squared norm of each normalised image; 0: off, dark backgrounds have large norms)."),
    div_weight: float = typer.Option(1.0, "--div-weight", help="Weight of the diversity term (mean pixel distance between images of one class in a batch, subtracted)."),
    student: Optional[str] = typer.Option(None, "--student", help="Student for the adaptive term: images where it disagrees with the teacher are sought."),
    adaptive_weight: Optional[float] = typer.Option(None, "--adaptive-weight", help="Weight of 1 - JS(teacher || student) [1 with --student, else 0]."),
    classes: Optional[List[str]] = typer.Option(None, "--classes", help="Class folder names in class-index order: a,b,c or an image folder (or builtin:digits) to read them from. Default: 0..K-1."),
    save_every: int = typer.Option(50, "--save-every", help="Save the generator's training state every N steps (what a killed run continues from)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the generator's initialisation and of every batch's noise."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (or an unfinished run with other settings)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON (and no progress)."),
):
    """Data-free: synthesize labelled images from a teacher alone, as an image folder to distill on.

    A small generator is trained against the DeepInversion loss (the teacher's BatchNorm statistics,
    its class score, image priors; optionally the adaptive term with a student), then sampled.
    Image size and normalisation are the teacher's. The folder has no dev split: evaluate students on
    real images (tdkd distill --dev-data). The same command continues a killed run from its last
    saved step and finished batches (OUTPUT.partial/), with bitwise the same result."""
    from ..methods.inversion import InversionWeights
    from ..tools import synthesize as synth
    from . import render

    adaptive = adaptive_weight if adaptive_weight is not None else (1.0 if student else 0.0)
    cfg = synth.SynthesisConfig(count=count, batch_size=batch_size, steps=steps, lr=lr, save_every=save_every, seed=seed,
                                weights=InversionWeights(ce=ce_weight, bn=bn_weight, tv=tv_weight, l2=l2_weight, div=div_weight, adaptive=adaptive))
    progress = render.progress("synthesizing", enabled=not as_json and sys.stderr.isatty())
    with progress:
        bar = progress.add_task("", total=None)
        report = synth.synthesize(
            teacher, output, cfg, student=student, classes=classes, force=force,
            on_start=lambda total, done: progress.update(bar, total=total, completed=done),
            on_step=lambda step, t: progress.update(bar, advance=1, description=f"generator step {step}: loss {t['loss']:.3g}"),
            on_batch=lambda b, info: progress.update(bar, advance=1, description=f"batch {b}: teacher agrees {info['teacher_agrees']:.0%}"))
    render.emit_json(report) if as_json else render.synthesize_report(report, teacher)


@app.command(epilog=_examples("tdkd recipes",
             "tdkd recipes sst2-demo  (print)",
             "tdkd recipes sst2-demo --copy my.yaml"))
def recipes(
    name: Optional[str] = typer.Argument(None, help="A built-in recipe to print (or copy with --copy)."),
    copy: Optional[Path] = typer.Option(None, "--copy", help="Copy the recipe to this file for editing."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --copy target."),
):
    """List the built-in recipes, print one, or copy one out for editing."""
    from ..io import checkpoint
    from ..core import recipe as recipe_mod
    from . import render

    if name is None:
        if copy is not None:
            raise _click_exc.UsageError("--copy needs a recipe NAME")
        d = recipe_mod.builtin_dir()
        render.recipes_table([(nm, recipe_mod.describe(d / f"{nm}.yaml")) for nm in recipe_mod.builtin_names()], d)
        return
    path = recipe_mod.resolve_path(name)
    recipe_mod.read(str(path))
    text = path.read_text()
    if copy is None:
        sys.stdout.write(text)
        return
    checkpoint.check_output(copy, force)
    checkpoint.atomic_write_text(copy, text)
    render.console().print(f"copied {path.name} -> {copy}; run it with: tdkd distill --recipe {copy} -o RUN")


@app.command(epilog=_examples("tdkd methods",
             "tdkd distill --recipe sst2-demo --method dkd:weight=1,beta=8 -o run",
             "tdkd distill ... --method sp:weight=3000,student=bert.pooler,teacher=bert.pooler -o run",
             "tdkd methods --plugin my_losses.py  (with the methods a plug-in registers)"))
def methods(
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON."),
    plugins: Optional[List[str]] = _plugin_option(),
):
    """List the distillation losses: built-in terms (recipe keys), methods (--method NAME:options)
    and plug-ins' methods."""
    from ..methods import plugins as plugins_mod
    from . import render

    plugins_mod.load_plugins(plugins or ())
    rows = plugins_mod.list_methods()
    render.emit_json(rows) if as_json else render.methods_table(rows)


@app.command("eval", epilog=_examples("tdkd eval student --data ../shared/data/glue/SST-2 --task sst2",
             "tdkd eval run/best --data data/rte.jsonl --text-column premise --text-column hypothesis --label-column label --json",
             "tdkd eval vit-merged --data images/ --predictions preds.jsonl"))
def eval_(
    model: str = typer.Argument(..., help="Dense HF/timm directory, MPO checkpoint (decompose/distill output), merged output, or preset."),
    data: str = typer.Option(..., "--data", help="Task directory (with dev.tsv, train.tsv), a .tsv/.csv/.jsonl file, an image folder (CLASS/*.png) for timm models, builtin:sst2-sample, or a graph for graph models (builtin:cora, builtin:citeseer, .npz, nodes + edges tables in CSV or Parquet: accuracy on the test and validation nodes)."),
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
    from ..tools import ops
    from . import render

    progress = render.progress("evaluating", enabled=not as_json and sys.stderr.isatty())
    with progress:
        bar = progress.add_task("", total=None)
        report = ops.evaluate_model(
            model, data, task=task, split=split, text_columns=text_column, label_column=label_column, tokenizer=tokenizer,
            batch_size=batch_size, max_length=max_length, device=device, limit=limit, predictions=predictions, init=init,
            on_total=lambda n: progress.update(bar, total=n), on_batch=lambda k: progress.update(bar, advance=k))
    render.emit_json(report) if as_json else render.eval_report(report, model)


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
    data: Optional[str] = typer.Option(None, "--data", help="A graph (builtin:cora, ...): time graph models on its test nodes (a GNN on their k-hop subgraph, an MLP on their features)."),
):
    """Inference latency (median, p90, p99), throughput, parameters and memory, several models side by side."""
    from ..tools import bench as bench_mod
    from ..io import checkpoint
    from ..tools import ops
    from . import render

    if output is not None:
        checkpoint.check_output(output, force=True)
    base = bench_mod.load_baseline(baseline) if baseline is not None else None
    progress = render.progress("benchmarking", enabled=not as_json and sys.stderr.isatty())
    with progress:
        bar = progress.add_task("", total=iters)
        report = ops.bench_models(models, device=device, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
                                  threads=threads, warmup=warmup, iters=iters, init=init, data=data,
                                  on_round=lambda: progress.update(bar, advance=1))
    failure = bench_mod.apply_gate(report, baseline, base, max_regression, gate) if base is not None else None
    if output is not None:
        checkpoint.atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    render.emit_json(report) if as_json else render.bench_report(report)
    if failure is not None:
        raise failure


@app.command(epilog=_examples("tdkd export student -o student.onnx",
                              "tdkd bench student student.onnx --batch-size 32 --seq-len 64   (eager vs ONNX Runtime)"))
def export(
    model: str = typer.Argument(..., help="Merged student (HF directory or timm directory), an MPO checkpoint (contracted first), or a preset."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (.onnx)."),
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    tolerance: float = typer.Option(1e-4, "--tolerance", help="Largest accepted |onnxruntime - PyTorch| relative to the largest |logit| on the probe."),
    init: str = typer.Option("pretrained", "--init", help="pretrained | random (presets build offline from their config)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Export a student as ONNX (dynamic batch and sequence axes; logits out), verified with onnxruntime.

    The file is run by onnxruntime on a probe batch of another shape than the traced one (with a
    padded row for text) and compared with PyTorch; above --tolerance it exits 1 and writes nothing.
    `tdkd bench` times .onnx files with onnxruntime beside PyTorch models."""
    from . import render
    from ..tools.export import export_onnx

    if format != "onnx":
        raise UsageError(f"--format {format!r} is not supported (onnx)")
    report = export_onnx(model, output, tolerance=tolerance, force=force, init=init)
    if as_json:
        render.emit_json(report)
    else:
        render.console().print(f"exported {model} -> {report['output']} (ONNX opset {report['opset']}, inputs "
                               f"{', '.join(report['inputs'])}; {report['bytes'] / 2**20:.1f} MB); onnxruntime vs PyTorch on "
                               f"a probe: max rel. diff {report['max_rel_diff']:.1e} (tolerance {report['tolerance']:g}) OK")


@app.command(epilog=_examples("tdkd report runs/kd runs/opdf -o report  (then open report/report.md)",
                              "tdkd report runs/exp/sst2/*-s* -o sst2-report --force"))
def report(
    runs: List[Path] = typer.Argument(..., help="tdkd distill run directories (finished or not)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output directory: PNG figures and report.md."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """Figures of training runs: loss terms and learning rate by step, the dev metric by step (runs
    that differ only by seed as mean and min..max band), and for MPO students the singular values at
    the bonds of a few layers at initialisation and after training; report.md embeds them."""
    from ..io import checkpoint
    from . import render
    from ..tools import report as report_mod

    checkpoint.check_output(output, force)
    summary = report_mod.write(runs, output, force=force)
    if as_json:
        render.emit_json(summary)
    else:
        render.console().print(f"report of {len(summary['runs'])} runs ({', '.join(summary['runs'])}): "
                               f"{', '.join(summary['figures'])} and report.md -> {summary['output']}")


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
