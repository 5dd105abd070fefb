"""The teacher/student pair of a run: load both, check they fit each other and the task, cut the
student from a deeper model, over-parameterize it (decompose on the fly with factor shapes planned
against the teacher), pair layers (layer map) and decompose the teacher's partner matrices once for
the tensor constraint.

``setup`` returns a ``Pair``; nothing here trains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from torch import nn

from . import layers, losses, methods, models, mpo, tensorize
from . import checkpoint as ckpt
from .errors import UsageError
from .model_files import load_any
from .recipe import Recipe


class Reporter:
    """What the engine tells the user; the CLI renders it (see render.DistillReporter)."""

    def info(self, text: str) -> None: ...
    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, step: int, total: int, record: dict) -> None: ...
    def evaluated(self, step: int, metrics: dict, best: bool) -> None: ...
    def finish(self) -> None: ...


@dataclass
class Pair:
    student: models.Loaded
    teacher: models.Loaded | None = None
    layer_map: list[int] | None = None  # teacher layer per student layer (None: no layer stack)
    teacher_cores: dict = field(default_factory=dict)  # teacher module name -> frozen cores
    core_pairs: list[losses.AlignedPair] = field(default_factory=list)

    def tokenizer_dir(self, override: str | None) -> Path | None:
        if override:
            return Path(override)
        return self.student.tokenizer_dir or (self.teacher.tokenizer_dir if self.teacher else None)


def no_teacher(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("none", "null", "")


def setup(r: Recipe, num_labels: int, reporter: Reporter, cut: Callable[[models.Loaded], str | None] | None = None) -> Pair:
    """Teacher (frozen later by the loop), student (cut, over-parameterized or merged as the recipe
    says), the layer map and, when tensor_lambda > 0, the teacher cores the constraint aligns to.
    ``cut(teacher)`` gives the student's layers when a method chooses them (Theseus)."""
    teacher = _load_teacher(r, num_labels)
    if cut is not None and teacher is not None:
        r = replace(r, student_layers=cut(teacher))
    student = _load_student(r, num_labels, teacher)
    lmap = None
    if teacher is not None:
        check_vocab(teacher, student)
        lmap = _layer_map(r.layer_map, student.model, teacher.model)
    _check_student(r, student, num_labels)
    is_mpo = bool(tensorize.mpo_modules(student.model))
    if not r.mpo and is_mpo:
        tensorize.merge(student.model)
        reporter.info("student cores contracted: mpo is false, training the dense student")
    elif r.mpo and not is_mpo:
        decompose_student(student, teacher, r, reporter, lmap)
    if r.attention_weight > 0:
        for m in (student.model, teacher.model):
            if hasattr(m, "set_attn_implementation"):
                m.set_attn_implementation("eager")
    pair = Pair(student, teacher, lmap)
    if teacher is not None and r.tensor_lambda > 0:
        pair.teacher_cores, pair.core_pairs = teacher_cores(student.model, teacher.model, reporter, lmap)
    return pair


def load_peer(r: Recipe, spec: str, seed: int, mpo: bool, num_labels: int, reporter: Reporter) -> models.Loaded:
    """One more student for an online method (a DML peer, the source of a ONE branch): loaded and
    cut like the run's student, with ``seed``, dense or in MPO form as ``mpo`` says (decomposed
    on the fly without a teacher to plan against)."""
    rr = replace(r, student=spec, seed=seed)
    student = _load_student(rr, num_labels, None)
    _check_student(rr, student, num_labels)
    is_mpo = bool(tensorize.mpo_modules(student.model))
    if is_mpo and not mpo:
        tensorize.merge(student.model)
    elif mpo and not is_mpo:
        decompose_student(student, None, rr, reporter)
    return student


def _load_teacher(r: Recipe, num_labels: int) -> models.Loaded | None:
    if no_teacher(r.teacher):
        loss_methods = [s for s in methods.parse_all(r.methods) if s.method.kind not in methods.TRAINING_SCHEMES]
        if r.tensor_lambda > 0 or r.hidden_weight > 0 or r.attention_weight > 0 or r.layer_map or loss_methods:
            raise UsageError("hidden_weight, attention_weight, tensor_lambda, layer_map and methods need a teacher (teacher is 'none')")
        return None
    teacher = load_any(r.teacher, init=r.init, num_labels=num_labels, weights=r.teacher_weights, seed=r.seed, keep_head=True)
    t_out = num_outputs(teacher)
    if t_out is None:
        raise UsageError(f"teacher {r.teacher} has no classification head; fine-tune it on the task first "
                         "(tdkd distill --teacher none --student MODEL ...)")
    if t_out != num_labels:
        raise UsageError(f"teacher {r.teacher} has {t_out} outputs but the task has {num_labels} labels")
    if tensorize.mpo_modules(teacher.model):
        tensorize.merge(teacher.model)
    return teacher


def _load_student(r: Recipe, num_labels: int, teacher: models.Loaded | None) -> models.Loaded:
    spec = r.student
    if spec is None:
        if not r.student_layers or teacher is None:
            raise UsageError("no student: pass --student MODEL, or --student-layers to cut one from the teacher")
        spec = r.teacher
    student = load_any(spec, init=r.init, num_labels=num_labels, weights=r.student_weights, seed=r.seed)
    if r.student_layers:
        if tensorize.mpo_modules(student.model):
            raise UsageError("--student-layers cuts a dense model; this student is already decomposed "
                             "(cut before decomposing: tdkd decompose --layers)")
        student = layers.cut_layers(student, r.student_layers)
    return student


def _check_student(r: Recipe, student: models.Loaded, num_labels: int) -> None:
    spec = r.student or r.teacher
    if student.family == "timm" and (r.hidden_weight > 0 or r.attention_weight > 0):
        raise UsageError("hidden_weight and attention_weight work with Hugging Face text models; for timm models use logit KD "
                         "and the tensor constraint")
    s_out = num_outputs(student)
    if s_out is not None and s_out != num_labels:
        raise UsageError(f"student {spec} has {s_out} outputs but the task has {num_labels} labels")
    if s_out is None:
        raise UsageError(f"student {spec} has no classification head")


def num_outputs(loaded: models.Loaded) -> int | None:
    """Classifier outputs of a model; None when it has no classification head."""
    if loaded.family == "timm":
        return getattr(loaded.model, "num_classes", None)
    cfg = loaded.model.config
    has_head = any(hasattr(loaded.model, h) for h in ("classifier", "score", "pre_classifier"))
    return int(cfg.num_labels) if has_head else None


def check_vocab(teacher: models.Loaded, student: models.Loaded) -> None:
    if teacher.family != student.family:
        raise UsageError(f"teacher is a {teacher.family} model and the student a {student.family} model; they must be of one kind")
    if teacher.family != "hf":
        return
    tv = int(getattr(teacher.model.config, "vocab_size", 0))
    sv = int(getattr(student.model.config, "vocab_size", 0))
    if tv != sv:
        raise UsageError(f"teacher and student have different vocabularies ({tv} vs {sv} tokens); "
                         "KD on text needs one tokenizer for both")
    if teacher.tokenizer_dir and student.tokenizer_dir:
        for name in ("vocab.txt", "vocab.json"):
            a, b = Path(teacher.tokenizer_dir) / name, Path(student.tokenizer_dir) / name
            if a.is_file() and b.is_file() and ckpt.sha256_file(a) != ckpt.sha256_file(b):
                raise UsageError(f"teacher and student have different vocabularies ({name} differs); "
                                 "KD on text needs one tokenizer for both")


def _layer_map(spec: str | None, student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """Teacher layer per student layer (losses.layer_map); None for models without a layer stack
    (e.g. CNNs), which then get logit KD only, unless a layer map was asked for."""
    try:
        ls, lt = layers.num_layers(student), layers.num_layers(teacher)
    except UsageError:
        if spec:
            raise
        return None
    return losses.layer_map(spec, ls, lt)


def partner_fn(student: nn.Module, teacher: nn.Module, lmap: list[int] | None = None):
    """name -> teacher module name (or None) for the tensor constraint and the shape planning:
    by the layer map for transformer stacks (default: the uniform map), by stage for CNNs
    (layers.block_partner)."""
    if lmap is None:
        try:
            lmap = losses.layer_map(None, layers.num_layers(student), layers.num_layers(teacher))
        except UsageError:
            return layers.block_partner(student, teacher)
    return lambda name: losses.partner_name(name, lmap)


def _weight_dims(module: nn.Module) -> tuple[tuple[int, int], int]:
    """((out, in/groups) channels, kernel window elements) of a Linear or Conv2d weight."""
    shape = tuple(module.weight.shape)
    return (shape[0], shape[1]), math.prod(shape[2:])


def _partner_module(t_mods: dict, t_name: str | None, student_module: nn.Module) -> nn.Module | None:
    """The teacher module ``t_name`` when it is a layer of the student module's kind."""
    t_mod = t_mods.get(t_name) if t_name else None
    kinds = (nn.Linear, nn.Conv2d)
    same = any(isinstance(t_mod, k) and isinstance(student_module, k) for k in kinds)
    return t_mod if same else None


def decompose_student(student: models.Loaded, teacher: models.Loaded | None, r: Recipe, reporter: Reporter,
                      lmap: list[int] | None = None) -> None:
    """Tensorize a dense student in place, planning factor shapes that align with the teacher."""
    model = student.model
    patterns = list(r.targets or ()) or list(tensorize.default_targets(model, student.family))
    names = tensorize.select_targets(model, patterns)
    explicit = tensorize.parse_shapes(r.shapes or [])
    plans = tensorize.plan_layers(model, names, r.n, explicit)
    if teacher is not None and not explicit:
        partner = partner_fn(model, teacher.model, lmap)
        s_mods, t_mods = dict(model.named_modules()), dict(teacher.model.named_modules())
        for p in plans:
            t_mod = _partner_module(t_mods, partner(p.name), s_mods[p.name])
            if t_mod is not None:
                t_dims, t_kernel = _weight_dims(t_mod)
                (so, si), _ = mpo.align_plans((p.out_features, p.weight_shape[1]), t_dims, r.n, kernels=(p.kernel, t_kernel))
                p.out_shape, p.in_shape = so, si
                p.bonds = mpo.full_bonds(so, si)
    tensorize.tensorize(model, plans)
    reporter.info(f"student decomposed on the fly: {len(plans)} matrices, n={r.n}")


def teacher_cores(student: nn.Module, teacher: nn.Module, reporter: Reporter,
                  lmap: list[int] | None = None) -> tuple[dict, list[losses.AlignedPair]]:
    """Decompose the teacher's partner matrices once with factor shapes matched to the student's,
    and pair their auxiliary cores; ``lmap`` pairs layers (default: the uniform map; CNNs by
    stage, see partner_fn). Returns (teacher cores by teacher module name, pairs)."""
    s_mods = tensorize.mpo_modules(student)
    if not s_mods:
        raise UsageError("tensor_lambda > 0 needs an MPO student (mpo: true, or a decompose output)")
    t_mods = dict(teacher.named_modules())
    partner = partner_fn(student, teacher, lmap)
    s_shapes, t_shapes, t_cores = {}, {}, {}
    for name, mod in s_mods.items():
        plan = tensorize.layer_plan(mod)
        s_shapes[name] = [tuple(c.shape) for c in tensorize.layer_cores(mod)]
        t_name = partner(name)
        t_mod = _partner_module(t_mods, t_name, mod)
        if t_mod is None or t_name in t_cores:
            continue
        t_dims, t_kernel = _weight_dims(t_mod)
        _, (to, ti) = mpo.align_plans((plan.out_features, plan.weight_shape[1]), t_dims, plan.n,
                                      (plan.out_shape, plan.in_shape), kernels=(plan.kernel, t_kernel))
        weight = t_mod.weight.detach()
        cores = mpo.decompose(weight.reshape(weight.shape[0], -1), to, ti)
        t_cores[t_name] = [c.detach().to(weight.dtype) for c in cores]
        t_shapes[t_name] = [tuple(c.shape) for c in t_cores[t_name]]
    pairs = losses.pair_layers(s_shapes, t_shapes, partner)
    aligned = sum(len(p.cores) for p in pairs)
    skipped = sum(len(p.skipped) for p in pairs)
    if aligned == 0:
        raise UsageError("tensor constraint: no auxiliary core of the student has the shape of its teacher partner; "
                         "set shapes so the trailing factors agree, or tensor_lambda: 0")
    reporter.info(f"tensor constraint: {len(pairs)} matrix pairs, {aligned} auxiliary cores aligned"
                  + (f", {skipped} skipped (shapes differ)" if skipped else ""))
    return t_cores, pairs
