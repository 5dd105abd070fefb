"""Distillation recipes: YAML files read with ``yaml.safe_load`` and checked against a schema.

A recipe is a flat mapping of the keys in ``SCHEMA``; every key is also a ``tdkd distill`` option
(``grad_accum`` <-> ``--grad-accum``), and an option given on the command line overrides the
recipe. Defaults < recipe < command line. A recipe holds only data: no tags, no imports, nothing
that names code to run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UsageError


def _key(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: every setting of a `tdkd distill` run, typed and immutable.

    Each field is a recipe key and a `tdkd distill` option (``grad_accum`` <-> ``--grad-accum``);
    None means "not set". ``SCHEMA`` below is derived from these fields."""

    description: str | None = _key(None, 'One line saying what the recipe is for (shown by `tdkd recipes`).')
    # models
    teacher: str | None = _key(None, "Teacher: HF directory or hub name, preset, timm name, MPO checkpoint, or 'none' (fine-tune without a teacher).")
    student: str | None = _key(None, 'Student: HF directory or hub name, preset, timm name, or a `tdkd decompose` output; on graph data gcn, sage, gat or mlp (sizes as options: mlp:hidden=64,layers=2). Default: cut from the teacher (with student_layers).')
    student_layers: str | None = _key(None, "Keep only these encoder layers of the student, e.g. '0,1,2' or 'every-other' (cuts a student from a deeper model).")
    init: str = _key('pretrained', 'pretrained | random (presets build offline from their config: smoke tests).')
    student_weights: str | None = _key(None, 'safetensors weights for a timm student.')
    teacher_weights: str | None = _key(None, 'safetensors weights for a timm teacher.')
    tokenizer: str | None = _key(None, 'Tokenizer directory when neither model directory has one.')
    # data
    data: str | None = _key(None, 'Task directory (train.tsv, dev.tsv), a .tsv/.csv/.jsonl file, an image folder, builtin:sst2-sample, or a graph: builtin:cora, builtin:citeseer, a .npz file or a directory with nodes.csv + edges.csv (or nodes.parquet + edges.parquet).')
    task: str | None = _key(None, 'sst2, rte, mrpc, cola, stsb, qnli, qqp, mnli. Default: guessed from the data path.')
    text_columns: tuple[str, ...] | None = _key(None, 'Text column(s) of a generic CSV/JSONL file (two for sentence pairs).')
    label_column: str | None = _key(None, 'Label column of a generic CSV/JSONL file.')
    train_split: str = _key('train', 'Training split of a task directory.')
    dev_split: str = _key('dev', "Evaluation split of a task directory ('none' to skip evaluation).")
    dev_data: str | None = _key(None, "Evaluate on the dev split (dev_split) of this data source instead of data's: e.g. real images for a student trained on `tdkd synthesize` output. Its classes (or task) must be data's.")
    train_limit: int | None = _key(None, 'Use only the first N training examples.')
    dev_limit: int | None = _key(None, 'Use only the first N evaluation examples.')
    max_length: int = _key(128, 'Truncate token sequences to this length.')
    graph_setting: str = _key('transductive', "Graph data: 'transductive' (the whole graph while training, loss on the training nodes, KD on every node) or 'inductive' (the test nodes' edges hidden while training; KD on every other node).")
    # over-parameterization
    mpo: bool = _key(True, 'Train the student in MPO form (over-parameterized); a dense student is decomposed on the fly.')
    n: int = _key(5, 'MPO cores per matrix when decomposing on the fly (the paper uses 5).')
    targets: tuple[str, ...] | None = _key(None, 'Glob patterns of Linear layers to decompose (default per model family).')
    shapes: tuple[str, ...] | None = _key(None, "Explicit factor shapes, e.g. ['768=32,1,1,1,24'].")
    # losses
    alpha: float = _key(1.0, 'Weight of logit KD; cross-entropy on labels gets 1 - alpha (ignored without a teacher).')
    temperature: float = _key(1.0, 'KD temperature T (the loss carries the T^2 factor).')
    layer_map: str | None = _key(None, "Teacher layer paired with each student layer by the hidden, attention and tensor-constraint losses, e.g. '0,1,2' (default 'uniform': teacher layer ceil((i+1)L_T/L_S)-1).")
    hidden_weight: float = _key(0.0, 'Weight of the hidden-state MSE (student layer i vs its layer_map partner).')
    attention_weight: float = _key(0.0, 'Weight of the attention-map MSE (same layer map; heads must match).')
    tensor_lambda: float = _key(0.0, 'Weight lambda of the OPDF tensor constraint loss on the auxiliary cores.')
    methods: tuple[str, ...] | None = _key(None, "Distillation methods added to the loss, each 'NAME:weight=W,option=value,...', e.g. 'dkd:weight=1,beta=8' or 'sp:weight=3000,student=bert.pooler,teacher=bert.pooler' (list them: tdkd methods).")
    # optimisation
    optimizer: str = _key('adamw', "adamw (decoupled weight decay) | adam (weight decay as an L2 term in the gradient, as Kipf & Welling's GCN and GLNN train; the graph default).")
    lr: float = _key(5e-05, 'Learning rate of the dense parameters.')
    mpo_lr: float | None = _key(None, 'Learning rate of the MPO cores (default: lr).')
    connector_lr: float | None = _key(None, 'Learning rate of the connectors feature methods train with the student (FitNets; default: lr).')
    weight_decay: float = _key(0.01, 'Weight decay of dense weight matrices (biases, norms and cores: none); see optimizer.')
    warmup_ratio: float = _key(0.0, 'Linear warm-up over this fraction of the steps, then the lr_schedule.')
    lr_schedule: str = _key('linear', "After warm-up: 'linear' (decay to 0 at the last step) or 'constant' (the graph default).")
    batch_size: int = _key(32, 'Examples per micro-batch (per process).')
    grad_accum: int = _key(1, 'Micro-batches per optimizer step.')
    epochs: float = _key(3.0, 'Passes over the training data (ignored when max_steps is set).')
    max_steps: int | None = _key(None, 'Optimizer steps to train (overrides epochs).')
    max_grad_norm: float = _key(1.0, 'Clip the global gradient norm to this (0: no clipping).')
    seed: int = _key(42, 'Seed of initialisation, data order and dropout.')
    precision: str = _key('fp32', 'fp32 | bf16 | fp16 (fp16: CUDA only, with loss scaling). Autocast for the student and teacher forward passes and the contraction of the cores; cores, weights, optimizer states and merge stay float32/float64.')
    teacher_cache: bool = _key(True, "Keep the teacher's outputs per training example (first sight) and skip its forward pass once a batch is all cached (from the second epoch); off: the teacher runs on every batch.")
    teacher_cache_mb: int = _key(2048, 'Largest teacher-output cache in MiB; above it the run keeps the teacher forward.')
    # bookkeeping
    eval_every: int = _key(0, 'Evaluate on the dev set every N steps (0: only at the end).')
    save_every: int = _key(0, 'Write a full-state checkpoint every N steps (0: only at the end).')
    keep_last: int = _key(2, 'Full-state checkpoints kept (plus the best model).')
    keep_best_only: bool = _key(False, 'When the run finishes, delete its checkpoints/ and keep best/ (for experiment arms; the run can then not be resumed or extended).')
    log_every: int = _key(10, 'Write averaged losses to metrics.jsonl every N steps.')
    eval_batch_size: int = _key(64, 'Examples per forward pass during evaluation.')
    tensorboard: bool = _key(False, 'Also write every logged term, the learning rate and each evaluation as TensorBoard scalars under RUN/tensorboard/ (needs the tensorboard package).')
    device: str = _key('auto', 'auto | cpu | cuda.')

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        """From a validated mapping of every key (lists become tuples)."""
        return cls(**{k: tuple(v) if SCHEMA[k][0] == "list" and v is not None else v for k, v in values.items()})

    def as_dict(self) -> dict[str, Any]:
        """Every key in schema order, lists as lists (what recipe.yaml stores)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((f.name, getattr(self, f.name)) for f in fields(self))}


def _kind(annotation: str) -> str:
    base = annotation.split("|")[0].strip()
    return "list" if base.startswith("tuple") else base


# key: (type, default, help). Types: "str", "int", "float", "bool", "list" (of strings).
# A None default means "not set"; such keys also accept null in a recipe.
SCHEMA: dict[str, tuple[str, Any, str]] = {f.name: (_kind(f.type), f.default, f.metadata["help"]) for f in fields(Recipe)}
KEYS = tuple(SCHEMA)

# Keys introduced after the format's first runs, with the value that reproduces an older run.
ADDED_KEYS_AS_BEFORE = {"teacher_cache": False, "precision": "fp32", "optimizer": "adamw", "lr_schedule": "linear"}

# Defaults on graph data (Kipf & Welling's GCN setting, which GLNN's MLP students share): one
# full-graph step per epoch, validated every epoch. A key the recipe or the command line sets wins;
# without a teacher the model trains dense unless mpo is set; with one, without weight decay.
GRAPH_DEFAULTS = {"optimizer": "adam", "lr": 0.01, "weight_decay": 5e-4, "lr_schedule": "constant", "max_grad_norm": 0.0,
                  "epochs": 200.0, "eval_every": 1, "log_every": 10}


def with_graph_defaults(r: Recipe, explicit: set[str], has_teacher: bool) -> Recipe:
    """``r`` with GRAPH_DEFAULTS for every key the user did not set."""
    import dataclasses

    values = {k: v for k, v in GRAPH_DEFAULTS.items() if k not in explicit}
    if "mpo" not in explicit and not has_teacher:
        values["mpo"] = False
    if "weight_decay" not in explicit and has_teacher:
        values["weight_decay"] = 0.0  # KD on every node regularizes; L2 5e-4 cost a dense GLNN student ~4 points
    return dataclasses.replace(r, **values)


# Keys that may change when a run is resumed (they do not change what is computed).
RESUMABLE_CHANGES = {"device", "log_every", "eval_batch_size", "description", "keep_last", "keep_best_only", "tensorboard"}


def defaults() -> dict[str, Any]:
    return {k: v[1] for k, v in SCHEMA.items()}


def _check_type(key: str, value: Any, where: str) -> Any:
    kind = SCHEMA[key][0]
    if value is None:
        return None
    if kind == "float" and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; accept what is plainly a number
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if kind == "list" and isinstance(value, str):
        value, ok = [value], True
    if not ok:
        what = {"list": "a list of strings", "int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}[kind]
        raise UsageError(f"{where}: {key} must be {what} (got {value!r})")
    if kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise UsageError(f"{where}: {key} must be a finite number (got {value!r})")
    return value


def validate(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Types of every key, unknown keys, and value ranges."""
    if not isinstance(values, dict):
        raise UsageError(f"{where}: a recipe must be a mapping of keys to values")
    out = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in SCHEMA:
            close = [k for k in SCHEMA if isinstance(key, str) and (k.startswith(key[:4]) or key.replace("-", "_") == k)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"{where}: unknown key {key!r}{hint}; known keys: see `tdkd distill --help`")
        out[key] = _check_type(key, value, where)
    return out


def check_ranges(rec: Recipe) -> None:
    """Value ranges of a resolved recipe (UsageError naming the key)."""
    r = rec.as_dict()
    def need(cond: bool, msg: str):
        if not cond:
            raise UsageError(msg)

    need(r["init"] in ("pretrained", "random"), f"init must be 'pretrained' or 'random' (got {r['init']!r})")
    need(r["max_length"] >= 2, f"max_length must be at least 2 (got {r['max_length']})")
    need(r["n"] >= 2, f"n must be at least 2 (got {r['n']})")
    need(0.0 <= r["alpha"] <= 1.0, f"alpha must be in [0, 1] (got {r['alpha']})")
    need(r["temperature"] > 0, f"temperature must be positive (got {r['temperature']})")
    for k in ("hidden_weight", "attention_weight", "tensor_lambda", "weight_decay", "max_grad_norm"):
        need(r[k] >= 0, f"{k} must be >= 0 (got {r[k]})")
    need(r["lr"] > 0, f"lr must be positive (got {r['lr']})")
    need(r["mpo_lr"] is None or r["mpo_lr"] > 0, f"mpo_lr must be positive (got {r['mpo_lr']})")
    need(r["connector_lr"] is None or r["connector_lr"] > 0, f"connector_lr must be positive (got {r['connector_lr']})")
    need(0.0 <= r["warmup_ratio"] < 1.0, f"warmup_ratio must be in [0, 1) (got {r['warmup_ratio']})")
    for k in ("batch_size", "grad_accum", "keep_last", "log_every", "eval_batch_size"):
        need(r[k] >= 1, f"{k} must be at least 1 (got {r[k]})")
    need(r["epochs"] > 0, f"epochs must be positive (got {r['epochs']})")
    need(r["max_steps"] is None or r["max_steps"] >= 1, f"max_steps must be at least 1 (got {r['max_steps']})")
    for k in ("eval_every", "save_every"):
        need(r[k] >= 0, f"{k} must be >= 0 (got {r[k]})")
    for k in ("train_limit", "dev_limit"):
        need(r[k] is None or r[k] >= 1, f"{k} must be at least 1 (got {r[k]})")
    need(r["graph_setting"] in ("transductive", "inductive"),
         f"graph_setting must be 'transductive' or 'inductive' (got {r['graph_setting']!r})")
    need(r["optimizer"] in ("adamw", "adam"), f"optimizer must be adamw or adam (got {r['optimizer']!r})")
    need(r["lr_schedule"] in ("linear", "constant"), f"lr_schedule must be linear or constant (got {r['lr_schedule']!r})")
    need(r["precision"] in ("fp32", "bf16", "fp16"), f"precision must be fp32, bf16 or fp16 (got {r['precision']!r})")
    need(r["teacher_cache_mb"] >= 0, f"teacher_cache_mb must be >= 0 (got {r['teacher_cache_mb']})")
    need(r["device"] in ("auto", "cpu", "cuda") or r["device"].startswith("cuda:"), f"device must be auto, cpu or cuda (got {r['device']!r})")
    need(bool(r["data"]), "no training data: pass --data (or set data: in the recipe)")
    need(r["teacher"] is not None or r["student"] is not None,
         "no models: pass --teacher (or 'none') and --student, or set them in the recipe")


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def builtin_dir() -> Path:
    """The shipped recipes: tdkd_cli/recipes/, package data (wheels carry them)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def builtin_names() -> list[str]:
    d = builtin_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def resolve_path(spec: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    name = spec[:-5] if spec.endswith(".yaml") else spec
    cand = builtin_dir() / f"{name}.yaml"
    if "/" not in spec and cand.is_file():
        return cand
    if p.exists():
        raise UsageError(f"recipe {spec} is not a file")
    raise UsageError(f"recipe {spec!r} not found (not a file, nor a built-in recipe: {', '.join(builtin_names()) or 'none'})")


def read(spec: str) -> dict[str, Any]:
    import yaml

    path = resolve_path(spec)
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read recipe {path}: {type(exc).__name__}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"recipe {path} is not valid YAML{at}: {getattr(exc, 'problem', None) or type(exc).__name__}") from None
    if values is None:
        values = {}
    return validate(values, str(path))


def resolve(recipe_spec: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """defaults < recipe file < command-line overrides, validated (a mapping of every key)."""
    r = defaults()
    if recipe_spec:
        r.update(read(recipe_spec))
    r.update(validate({k: v for k, v in overrides.items() if v is not None}, "command line"))
    return r


def build(recipe_spec: str | None, overrides: dict[str, Any]) -> tuple[Recipe, set[str]]:
    """(the resolved Recipe, the keys the user set in the recipe file or on the command line).
    ``overrides``: command-line values by key, None where an option was not given."""
    explicit = {k for k, v in overrides.items() if v is not None}
    if recipe_spec:
        explicit |= set(read(recipe_spec))
    return Recipe.from_dict(resolve(recipe_spec, overrides)), explicit


def for_resume(stored: dict[str, Any], given: Recipe, explicit: set[str], where: str) -> Recipe:
    """The recipe a resumed run continues: the stored one, where the user may change only
    ``RESUMABLE_CHANGES``; any other key set to a different value is a UsageError."""
    # keys added after a run was started take the value that reproduces it, not today's default
    merged = {**defaults(), **ADDED_KEYS_AS_BEFORE, **validate(stored, where)}
    now = given.as_dict()
    changed = [k for k in SCHEMA if k in explicit and k not in RESUMABLE_CHANGES and now.get(k) != merged.get(k)]
    if changed:
        k = changed[0]
        raise UsageError(f"--resume continues the recipe stored in {where}; {k} differs "
                         f"(stored {merged.get(k)!r}, given {now.get(k)!r})")
    for k in RESUMABLE_CHANGES & explicit:
        merged[k] = now[k]
    rec = Recipe.from_dict(merged)
    check_ranges(rec)
    return rec


def dump(r: Recipe) -> str:
    import yaml

    return yaml.safe_dump(r.as_dict(), sort_keys=False, default_flow_style=False)


def describe(path: Path) -> str:
    try:
        return str(read(str(path)).get("description") or "")
    except UsageError as exc:
        return f"(invalid: {exc})"
