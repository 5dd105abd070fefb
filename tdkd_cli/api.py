"""tdkd's Python API: over-parameterized students in your own training loop.

    from tdkd_cli import MPOConfig, overparameterize, TensorConstraint, DistillLoss, param_groups, merge

    overparameterize(student, MPOConfig(n=5), teacher=teacher)    # Linear/Conv2d weights -> MPO cores
    constraint = TensorConstraint(student, teacher)               # OPDF: auxiliary cores -> teacher's
    distill = DistillLoss(student, teacher, ["kd:temperature=2"]) # any method of `tdkd methods`
    opt = torch.optim.AdamW(param_groups(student, lr=1e-4, mpo_lr=1e-4) + distill.param_groups(lr=1e-4))
    ...  loss = distill(s_logits, t_logits, batch) + 100 * constraint()
    merge(student)                                                # contract back, verified; plain model

These are the functions ``tdkd distill`` / ``merge`` are built on (tensor.align, tensor.constraint,
engine.optim, tools.ops, io.model_files), with errors of tdkd's own type (``TdkdError``) whose
message names the argument at fault. docs/API.md documents every name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .core.errors import CheckpointError, TdkdError, UsageError
from .engine.optim import param_groups
from .io import checkpoint as ckpt
from .io import layers, models
from .io.model_files import load_mpo_model, write_model_files
from .methods import binding, loss_terms, registry
from .methods.features import FeatureTap
from .methods.losses import attention_mse, ce_loss, hidden_mse, kd_loss
from .methods.method_losses import at_loss, cc_loss, dist_loss, dkd_loss, fitnet_loss, rkd_loss, sp_loss
from .methods.plugins import list_methods, load_plugins, register_method
from .tensor import align, constraint, tensorize
from .tools.ops import merge_model

__all__ = [
    "MPOConfig", "overparameterize", "TensorConstraint", "DistillLoss", "param_groups", "merge", "save_mpo", "load_mpo",
    "register_method", "list_methods", "load_plugins", "TdkdError",
    "kd_loss", "ce_loss", "hidden_mse", "attention_mse", "dkd_loss", "dist_loss", "fitnet_loss", "at_loss", "sp_loss",
    "rkd_loss", "cc_loss",
]


@dataclass(frozen=True)
class MPOConfig:
    """What to over-parameterize and how; the options of ``tdkd decompose``.

    ``targets``: glob patterns of module names (default: the family's: BERT-like query/key/value,
    attention output, intermediate and output dense; ViT qkv/proj/fc1/fc2; other timm models every
    Conv2d and every Linear but the head). ``n``: cores per matrix. ``shapes``: explicit factor
    shapes, e.g. ``("768=8,2,2,2,2,6",)``. ``rank``: cap on the bond dimensions (None: lossless)."""

    targets: Sequence[str] = field(default_factory=tuple)
    n: int = 5
    shapes: Sequence[str] = field(default_factory=tuple)
    rank: int | None = None


def family_of(model: nn.Module) -> str:
    """'hf' for a transformers model (it has a config with a model_type), else 'timm' (timm models
    and plain torch modules: Conv2d / Linear targets)."""
    return "hf" if hasattr(getattr(model, "config", None), "model_type") else "timm"


def _check_module(value, name: str) -> None:
    if not isinstance(value, nn.Module):
        raise UsageError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")


_CLI_WORDS = (("pass --targets PATTERN", "set MPOConfig(targets=[PATTERN, ...])"), ("--shapes ", "shapes "),
              ("--n ", "n "), ("--rank ", "rank "))


def _named(name: str, exc: TdkdError) -> TdkdError:
    """The same error type with the argument's name in front of its message (options called as
    the API calls them, not as the command line does)."""
    text = str(exc)
    for cli, api in _CLI_WORDS:
        text = text.replace(cli, api)
    return type(exc)(f"{name}: {text}")


def overparameterize(model: nn.Module, config: MPOConfig | None = None, teacher: nn.Module | None = None) -> nn.Module:
    """Replace every targeted Linear / Conv2d weight of ``model`` by MPO cores, in place, and return
    the model (same class; each weight is a torch parametrization computed from its cores).

    With a ``teacher``, factor shapes are planned against its partner layers (the uniform layer map
    for layer stacks, stage by stage for CNNs) so the tensor constraint can align auxiliary cores."""
    _check_module(model, "model")
    config = config or MPOConfig()
    if not isinstance(config, MPOConfig):
        raise UsageError(f"config: expected an MPOConfig, got {type(config).__name__}")
    if config.n < 2 or (config.rank is not None and config.rank < 1):
        raise UsageError(f"config: n must be at least 2 and rank at least 1 (got n={config.n}, rank={config.rank})")
    partner = None
    if teacher is not None:
        _check_module(teacher, "teacher")
        partner = layers.partner_fn(model, teacher)
    try:
        plans = align.overparameterize(model, family_of(model), targets=config.targets, n=config.n, shapes=config.shapes,
                                       rank=config.rank, teacher=teacher, partner=partner)
    except UsageError as exc:  # the config's targets/shapes did not fit, or the model has nothing to target
        raise _named("config" if config.targets or config.shapes else "model", exc) from None
    if teacher is not None and not config.shapes:
        t_mods = dict(teacher.named_modules())
        s_mods = dict(model.named_modules())
        if not any(align.partner_module(t_mods, partner(p.name), s_mods[p.name]) is not None for p in plans):
            tensorize.merge(model)  # leave the model as it was
            raise UsageError("teacher: none of its layers pairs with the student's over-parameterized layers "
                             "(different module names or kinds), so no shape can be aligned; pass teacher=None")
    return model


class TensorConstraint(nn.Module):
    """The OPDF tensor constraint bound to (student, teacher): ``constraint()`` is the mean over
    paired matrices of the MSE between the student's current auxiliary cores and the teacher's
    (decomposed once here, held as buffers, no gradient). Multiply it by lambda (the paper: 100)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        _check_module(student, "student")
        _check_module(teacher, "teacher")
        if not tensorize.mpo_modules(student):
            raise UsageError("student: not over-parameterized (call overparameterize(student, config, teacher) first)")
        if tensorize.mpo_modules(teacher):
            raise UsageError("teacher: it has MPO layers; merge(teacher) first")
        try:
            cores, self.pairs = constraint.teacher_cores(student, teacher, layers.partner_fn(student, teacher))
        except UsageError as exc:
            raise _named("teacher", exc) from None
        self._keys = {}
        for name, cs in cores.items():
            for k, c in enumerate(cs):
                key = f"t{len(self._keys)}"
                self.register_buffer(key, c)
                self._keys[(name, k)] = key
        self._teacher_names = list(cores)
        self._student = [student]  # a plain list: the student's parameters are not this module's

    def teacher_cores(self) -> dict[str, list[torch.Tensor]]:
        out = {}
        for (name, k), key in self._keys.items():
            out.setdefault(name, []).append(getattr(self, key))
        return out

    def forward(self) -> torch.Tensor:
        student = self._student[0]
        s_cores = {n: tensorize.layer_cores(m) for n, m in tensorize.mpo_modules(student).items()}
        return constraint.tensor_constraint_loss(s_cores, self.teacher_cores(), self.pairs)

    def extra_repr(self) -> str:
        return constraint.describe(self.pairs)


class DistillLoss(nn.Module):
    """Logit KD plus the methods of ``tdkd methods`` (and registered plug-ins), bound to
    (student, teacher) as ``tdkd distill`` binds them: ``loss = distill(s_logits, t_logits, batch)``.

    ``methods``: specs as on the command line, e.g. ``"dist:weight=1"`` or
    ``"fitnet:weight=1,student=layer3,teacher=layer3"``. Feature methods read module outputs through
    forward hooks installed here (``close()`` removes them), so run both forwards before calling;
    their connectors (FitNets projections) are this module's parameters: add ``param_groups()`` to
    your optimizer. ``example``: one batch (dict of the model's inputs: ``input_ids``... for
    transformers, ``x`` for images) whose forward gives the feature shapes; needed for feature methods.
    ``kd``/``temperature``: weight and T of ``T^2 KL(p_t || p_s)``; ``ce``: weight of cross-entropy
    on ``batch["labels"]``. The parts of the last call are in ``.parts``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, methods: Sequence[str] = (), *, kd: float = 1.0,
                 temperature: float = 1.0, ce: float = 0.0, example: dict | None = None, seed: int = 0):
        super().__init__()
        _check_module(student, "student")
        _check_module(teacher, "teacher")
        if isinstance(methods, str):
            methods = [methods]
        if not (temperature > 0 and math.isfinite(temperature)):
            raise UsageError(f"temperature: must be a positive number (got {temperature})")
        self.kd, self.temperature, self.ce = float(kd), float(temperature), float(ce)
        lmap = layers.model_layer_map(None, student, teacher)
        load_plugins()  # methods that installed packages offer (entry points)
        try:
            specs = registry.parse_all(methods)
        except UsageError as exc:
            raise _named("methods", exc) from None
        schemes = [s.method.name for s in specs if s.method.kind in registry.TRAINING_SCHEMES]
        if schemes:
            raise UsageError(f"methods: {schemes[0]} is a way to train (online / replacement), not a loss; use tdkd distill")
        needs_probe = any(s.method.features for s in specs)
        if needs_probe and example is None:
            raise UsageError("example: feature methods need one example batch to learn the feature shapes")
        bound = binding.bind(list(methods), student, teacher, lmap, self._probe(student, teacher, example), seed)
        self.terms = bound.terms
        self.connectors = nn.ModuleDict({k.replace(".", "_"): v for k, v in bound.connectors.items()})
        self._connector_names = dict(zip(bound.connectors, self.connectors.keys()))
        s_paths, t_paths = loss_terms.feature_paths(bound.terms, None)
        self._taps = (FeatureTap(student, s_paths, "student"), FeatureTap(teacher, t_paths, "teacher"))
        self.parts: dict[str, float] = {}

    def _probe(self, student, teacher, example):
        def probe(s_paths, t_paths):
            shapes = []
            for role, model, paths in (("student", student, s_paths), ("teacher", teacher, t_paths)):
                was = model.training
                with FeatureTap(model, paths, role) as tap, torch.no_grad():
                    model.eval()
                    loss_terms.forward(model, family_of(model), example)
                    shapes.append({p: tuple(v.shape) for p, v in tap.features.items()})
                model.train(was)
            return shapes[0], shapes[1]
        return probe

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict]:
        """The connectors as one optimizer parameter group (empty when no method needs one)."""
        params = list(self.connectors.parameters())
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "connectors"}] if params else []

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        batch = batch or {}
        s_tap, t_tap = self._taps
        s_out = loss_terms.Outputs(student_logits, features=dict(s_tap.features))
        t_out = loss_terms.Outputs(teacher_logits.detach(), features={k: v.detach() for k, v in t_tap.features.items()})
        parts = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if self.kd > 0:
            parts["kd"] = kd_loss(student_logits, t_out.logits, self.temperature)
            total = total + self.kd * parts["kd"]
        if self.ce > 0:
            if "labels" not in batch:
                raise UsageError("batch: ce > 0 needs batch['labels']")
            parts["ce"] = ce_loss(student_logits, batch["labels"])
            total = total + self.ce * parts["ce"]
        ctx = loss_terms.Context(temperature=self.temperature,
                                 connectors={k: self.connectors[v] for k, v in self._connector_names.items()})
        for term, weight in self.terms:
            parts[term.name] = term.compute(s_out, t_out, batch, ctx)
            total = total + weight * parts[term.name]
        self.parts = {k: float(v.detach()) for k, v in parts.items()}
        return total

    def close(self) -> None:
        """Remove the forward hooks from both models."""
        for tap in self._taps:
            tap.close()


def merge(model: nn.Module, *, example: dict | None = None, tolerance: float = 1e-4) -> nn.Module:
    """Contract every MPO layer back into a dense weight, in place (float64 contraction), and
    return the model: its plain architecture, which ``save_pretrained`` / ``timm`` load.

    Verified: the outputs on ``example`` (default: a seeded probe batch of the model's kind) after
    the merge equal the MPO form's within ``tolerance`` (relative), else a VerificationError."""
    _check_module(model, "model")
    if not tensorize.mpo_modules(model):
        raise UsageError("model: it was never over-parameterized (no MPO layers), so there is nothing to merge")
    family = family_of(model)
    was = model.training
    model.eval()
    probe = example if example is not None else models.probe_inputs(model, family, device=_device(model))
    merge_model(model, family, probe, tolerance)
    model.train(was)
    return model


def _device(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return str(p.device) if p is not None else "cpu"


def save_mpo(model: nn.Module, directory: str | Path, *, tokenizer_dir: str | Path | None = None,
             timm_kwargs: dict | None = None, force: bool = False) -> Path:
    """Write an over-parameterized (or dense) model in tdkd's checkpoint format (model.safetensors +
    tdkd.json), atomically; ``tdkd merge``, ``tdkd eval`` and ``tdkd distill --student`` read it.
    The architecture is rebuilt from the model's config (transformers) or its timm name plus
    ``timm_kwargs`` (the arguments it was created with beyond num_classes); checked by reloading."""
    _check_module(model, "model")
    out = Path(directory)
    ckpt.check_output(out, force)
    source = _source(model, timm_kwargs)
    cores = tensorize.mpo_modules(model)
    n = len(tensorize.layer_cores(next(iter(cores.values())))) if cores else None
    with ckpt.atomic_dir(out, force=force, what="MPO model") as tmp:
        write_model_files(tmp, model, source, Path(tokenizer_dir) if tokenizer_dir else None, n=n)
        try:
            load_mpo_model(tmp)
        except CheckpointError as exc:
            raise UsageError(f"model: its architecture cannot be rebuilt from what tdkd records ({exc}); "
                             "for a timm model pass timm_kwargs= with the arguments it was created with") from None
    return out


def _source(model: nn.Module, timm_kwargs: dict | None) -> dict:
    if family_of(model) == "hf":
        return models.hf_source(model, getattr(model.config, "_name_or_path", "") or type(model).__name__)
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise UsageError("model: neither a transformers model (config) nor a timm model (pretrained_cfg); "
                         "tdkd's checkpoint format rebuilds only those")
    kwargs = {"num_classes": int(getattr(model, "num_classes", 0)), **dict(timm_kwargs or {})}
    return {"family": "timm", "spec": name, "model_name": name, "kwargs": kwargs}


def load_mpo(directory: str | Path) -> nn.Module:
    """A model written by ``save_mpo``, ``tdkd decompose`` or ``tdkd distill`` (RUN/best), in MPO
    form when it was saved so (its cores trainable), in eval mode."""
    return load_mpo_model(Path(directory))[0].model
