"""The teacher/student pair of a run, in order: load both (model_files.load_any), check they fit
each other and the task, cut the student from a deeper model (layers.cut_layers), pair their layers
(layers.model_layer_map), over-parameterize the student with factor shapes planned against the
teacher (tensor.align), and decompose the teacher's partner matrices once for the tensor
constraint (tensor.constraint).

``setup`` returns a ``Pair``; nothing here trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from . import layers, models
from .model_files import load_any
from ..core.errors import UsageError
from ..core.recipe import Recipe
from ..core.reporting import Reporter
from ..tensor import align, constraint, tensorize


@dataclass
class Pair:
    student: models.Loaded
    teacher: models.Loaded | None = None
    layer_map: list[int] | None = None  # teacher layer per student layer (None: no layer stack)
    teacher_cores: dict = field(default_factory=dict)  # teacher module name -> frozen cores
    core_pairs: list[constraint.AlignedPair] = field(default_factory=list)

    def tokenizer_dir(self, override: str | None) -> Path | None:
        if override:
            return Path(override)
        return self.student.tokenizer_dir or (self.teacher.tokenizer_dir if self.teacher else None)


def no_teacher(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() in ("none", "null", "")


def setup(r: Recipe, num_labels: int, reporter: Reporter, cut: Callable[[models.Loaded], str | None] | None = None,
          graph_features: int | None = None) -> Pair:
    """Teacher (frozen later by the loop), student (cut, over-parameterized or merged as the recipe
    says), the layer map and, when tensor_lambda > 0, the teacher cores the constraint aligns to.
    ``cut(teacher)`` gives the student's layers when a method chooses them (Theseus).
    ``graph_features``: the width of a graph's node features (graph data; None otherwise)."""
    teacher = _load_teacher(r, num_labels, graph_features)
    if cut is not None and teacher is not None:
        r = replace(r, student_layers=cut(teacher))
    student = _load_student(r, num_labels, teacher, graph_features)
    for role, loaded in (("teacher", teacher), ("student", student)):
        check_data_fits(loaded, r.teacher if role == "teacher" else (r.student or r.teacher), graph_features)
    lmap = None
    if teacher is not None:
        check_vocab(teacher, student)
        lmap = layers.model_layer_map(r.layer_map, student.model, teacher.model)
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
        partner = layers.partner_fn(student.model, teacher.model, lmap)
        pair.teacher_cores, pair.core_pairs = constraint.teacher_cores(student.model, teacher.model, partner)
        reporter.info(constraint.describe(pair.core_pairs))
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


def _load_teacher(r: Recipe, num_labels: int, graph_features: int | None = None) -> models.Loaded | None:
    if no_teacher(r.teacher):
        return None
    check_data_fits(None, r.teacher, graph_features)
    teacher = load_any(r.teacher, init=r.init, num_labels=num_labels, weights=r.teacher_weights, seed=r.seed, keep_head=True,
                       graph_features=graph_features)
    t_out = num_outputs(teacher)
    if t_out is None:
        raise UsageError(f"teacher {r.teacher} has no classification head; fine-tune it on the task first "
                         "(tdkd distill --teacher none --student MODEL ...)")
    if t_out != num_labels:
        raise UsageError(f"teacher {r.teacher} has {t_out} outputs but the task has {num_labels} labels")
    if tensorize.mpo_modules(teacher.model):
        tensorize.merge(teacher.model)
    return teacher


def _load_student(r: Recipe, num_labels: int, teacher: models.Loaded | None, graph_features: int | None = None) -> models.Loaded:
    spec = r.student
    if spec is None:
        if not r.student_layers or teacher is None:
            raise UsageError("no student: pass --student MODEL, or --student-layers to cut one from the teacher")
        spec = r.teacher
    check_data_fits(None, spec, graph_features)
    student = load_any(spec, init=r.init, num_labels=num_labels, weights=r.student_weights, seed=r.seed,
                       graph_features=graph_features)
    if r.student_layers:
        if tensorize.mpo_modules(student.model):
            raise UsageError("--student-layers cuts a dense model; this student is already decomposed "
                             "(cut before decomposing: tdkd decompose --layers)")
        student = layers.cut_layers(student, r.student_layers)
    return student


def _check_student(r: Recipe, student: models.Loaded, num_labels: int) -> None:
    spec = r.student or r.teacher
    if student.family != "hf" and (r.hidden_weight > 0 or r.attention_weight > 0):
        raise UsageError("hidden_weight and attention_weight work with Hugging Face text models; for timm models use logit KD "
                         "and the tensor constraint")
    s_out = num_outputs(student)
    if s_out is not None and s_out != num_labels:
        raise UsageError(f"student {spec} has {s_out} outputs but the task has {num_labels} labels")
    if s_out is None:
        raise UsageError(f"student {spec} has no classification head")


def num_outputs(loaded: models.Loaded) -> int | None:
    """Classifier outputs of a model; None when it has no classification head."""
    if loaded.family == "pyg":
        return int(loaded.source["kwargs"]["out_channels"])
    if loaded.family == "timm":
        return getattr(loaded.model, "num_classes", None)
    cfg = loaded.model.config
    has_head = any(hasattr(loaded.model, h) for h in ("classifier", "score", "pre_classifier"))
    return int(cfg.num_labels) if has_head else None


def check_data_fits(loaded: models.Loaded | None, spec: str | None, graph_features: int | None) -> None:
    """A graph model on graph data with its feature width; any other model on any other data.
    Without ``loaded`` (before loading) the family is read from the spec where it says it."""
    family = loaded.family if loaded is not None else _spec_family(spec)
    if family is None:
        return
    kind = {"hf": "text", "timm": "image", "pyg": "graph"}.get(family, family)
    if graph_features is not None and family != "pyg":
        raise UsageError(f"{spec} is a {kind} model ({family}); graph data needs a graph model: "
                         "gcn, sage, gat, mlp or a tdkd checkpoint of one")
    if graph_features is None and family == "pyg":
        raise UsageError(f"{spec} is a graph model; it trains on graph data (builtin:cora, builtin:citeseer, a .npz "
                         "file or a directory with nodes + edges tables, .csv or .parquet)")
    width = loaded.source.get("kwargs", {}).get("in_channels") if loaded is not None and family == "pyg" else None
    if width is not None and graph_features is not None and width != graph_features:
        raise UsageError(f"{spec} takes {width} node features but the graph has {graph_features}")


def _spec_family(spec: str | None) -> str | None:
    """'pyg' for a graph preset, a model directory's family, None when only loading can tell."""
    import json

    if not spec or no_teacher(spec):
        return None
    if models.graph_models.is_graph_preset(spec):
        return "pyg"
    p = Path(spec).expanduser()
    if not p.is_dir():
        return None
    kind = ckpt.detect_kind(p)
    if kind != "mpo":
        return kind
    try:
        return json.loads((p / ckpt.MANIFEST).read_text())["source"]["family"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the loader names what is wrong with it


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


def decompose_student(student: models.Loaded, teacher: models.Loaded | None, r: Recipe, reporter: Reporter,
                      lmap: list[int] | None = None) -> None:
    """Tensorize a dense student in place (tensor.align.overparameterize), planning factor shapes
    that align with the teacher's partner layers."""
    partner = layers.partner_fn(student.model, teacher.model, lmap) if teacher is not None else None
    plans = align.overparameterize(student.model, student.family, targets=r.targets, n=r.n, shapes=r.shapes or (),
                                   teacher=teacher.model if teacher is not None else None, partner=partner)
    reporter.info(f"student decomposed on the fly: {len(plans)} matrices, n={r.n}")
