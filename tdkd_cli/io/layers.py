"""The layer stack of a transformer model: find it, count it, cut a student from a deeper model by
keeping some of its layers (weights copied, layers renumbered), and pair student layers and modules
with the teacher's (the layer map; CNN blocks by stage): which teacher module each student module
is compared with by the layer-wise losses and the tensor constraint."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from . import graph_models, models
from ..core.errors import UsageError

_LAYER_LISTS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "blocks")


def layer_list(model) -> tuple[str, Any]:
    """(dotted path, container) of the model's stack of transformer layers."""
    from torch import nn

    mods = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for rel in _LAYER_LISTS:
        for path in ((f"{prefix}.{rel}" if prefix else rel), rel):
            m = mods.get(path)
            if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 0:
                return path, m
    raise UsageError(f"cannot find the layer stack of {type(model).__name__} (looked for {', '.join(_LAYER_LISTS)})")


def num_layers(model) -> int:
    return len(layer_list(model)[1])


def parse_layers(spec: str, total: int) -> list[int]:
    """'0,1,2' | 'every-other' (1,3,5,...: every second layer, ending on the last) | 'first-K'."""
    s = spec.strip().lower()
    if s in ("every-other", "every_other", "alternate"):
        keep = list(range(1, total, 2)) or [0]
    elif s.startswith("first-"):
        try:
            k = int(s[6:])
        except ValueError:
            raise UsageError(f"layers {spec!r}: expected first-K, e.g. first-3") from None
        keep = list(range(k))
    else:
        try:
            keep = [int(x) for x in s.split(",") if x.strip() != ""]
        except ValueError:
            raise UsageError(f"layers {spec!r}: expected indices like 0,1,2 or 'every-other'") from None
    if not keep:
        raise UsageError(f"layers {spec!r} keeps no layer")
    bad = [i for i in keep if not 0 <= i < total]
    if bad:
        raise UsageError(f"layers {spec!r}: layer {bad[0]} does not exist (the model has {total}: 0..{total - 1})")
    if len(set(keep)) != len(keep):
        raise UsageError(f"layers {spec!r} names a layer twice")
    return keep


def cut_layers(loaded: models.Loaded, spec: str) -> models.Loaded:
    """A new model keeping only some layers of ``loaded`` (weights copied, layers renumbered),
    with a config/source describing the smaller architecture so manifests rebuild it offline."""
    import copy
    import re

    model = loaded.model
    path, stack = layer_list(model)
    keep = parse_layers(spec, len(stack))
    new_index = {old: new for new, old in enumerate(keep)}
    pat = re.compile(rf"^{re.escape(path)}\.(\d+)\.(.*)$")
    state = {}
    for key, value in model.state_dict().items():
        m = pat.match(key)
        if m is None:
            state[key] = value
        elif int(m[1]) in new_index:
            state[f"{path}.{new_index[int(m[1])]}.{m[2]}"] = value
    source = copy.deepcopy(loaded.source)
    if loaded.family == "hf":
        cfg = source["config"]
        for k in ("num_hidden_layers", "n_layers", "num_layers"):
            if k in cfg:
                cfg[k] = len(keep)
        new = models.hf_from_config(cfg, None, source["architecture"])
    else:
        source["kwargs"] = dict(source.get("kwargs", {}), depth=len(keep))
        new = models.build_from_source(source)
    models.load_state_strict(new, state, f"cannot cut layers {spec!r} from this model", UsageError)
    source["spec"] = f"{loaded.source.get('spec')}[layers {','.join(map(str, keep))}]"
    return models.Loaded(new.eval(), loaded.family, source, loaded.tokenizer_dir)


def teacher_layer(i: int, student_layers: int, teacher_layers: int) -> int:
    """Partner teacher layer of student layer i (0-based): ceil((i+1) * L_T / L_S) - 1 (2i+1 for 12->6)."""
    return math.ceil((i + 1) * teacher_layers / student_layers) - 1


def layer_map(spec: str | None, student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer paired with each student layer by the layer-wise losses (hidden states,
    attention maps, tensor constraint). ``spec``: None or 'uniform' (``teacher_layer``), or a
    comma-separated list with one teacher layer per student layer, e.g. '0,1,2'."""
    if spec is None or str(spec).strip().lower() == "uniform":
        return [teacher_layer(i, student_layers, teacher_layers) for i in range(student_layers)]
    parts = [x.strip() for x in str(spec).split(",")]
    if not all(re.fullmatch(r"\d+", x) for x in parts):
        raise UsageError(f"layer_map '{spec}': expected 'uniform' or teacher layer numbers like 0,1,2")
    out = [int(x) for x in parts]
    if len(out) != student_layers:
        raise UsageError(f"layer_map '{spec}' names {len(out)} teacher layers but the student has {student_layers} layers")
    bad = [x for x in out if x >= teacher_layers]
    if bad:
        raise UsageError(f"layer_map '{spec}': the teacher has layers 0..{teacher_layers - 1} (got {bad[0]})")
    return out



_LAYER_RE = re.compile(r"(?P<pre>.*\blayer\.|.*\bblocks\.)(?P<idx>\d+)(?P<post>\..*)")


def partner_name(student_name: str, lmap: Sequence[int]) -> str | None:
    """Name of the teacher module that pairs with a student module under the layer map ``lmap``
    (``layer_map``): same module in teacher layer lmap[i]. None outside the encoder layers."""
    m = _LAYER_RE.fullmatch(student_name)
    if m is None or int(m["idx"]) >= len(lmap):
        return None
    return f"{m['pre']}{lmap[int(m['idx'])]}{m['post']}"


def model_layer_map(spec: str | None, student, teacher) -> list[int] | None:
    """Teacher layer per student layer (``layer_map``); None for models without a layer stack
    (e.g. CNNs), which then get logit KD only, unless a layer map was asked for."""
    try:
        ls, lt = num_layers(student), num_layers(teacher)
    except UsageError:
        if spec:
            raise
        return None
    return layer_map(spec, ls, lt)


def partner_fn(student, teacher, lmap: list[int] | None = None) -> Callable[[str], str | None]:
    """name -> teacher module name (or None) for the tensor constraint and the shape planning:
    by the layer map for transformer stacks (default: the uniform map), by stage for CNNs
    (``block_partner``), by the uniform map over the layer lists for PyG graph models."""
    if graph_models.is_graph_model(student) and graph_models.is_graph_model(teacher):
        return graph_models.partner_fn(student, teacher)
    if lmap is None:
        try:
            lmap = layer_map(None, num_layers(student), num_layers(teacher))
        except UsageError:
            return block_partner(student, teacher)
    return lambda name: partner_name(name, lmap)


def block_partner(student, teacher):
    """Teacher module paired with each student module of a model without one transformer layer
    stack (CNNs: stages of blocks). A module inside a block is paired by stage: the block container
    is its deepest ``nn.Sequential``/``nn.ModuleList`` ancestor whose children are all of one class
    (ResNet ``layer2``, EfficientNet ``blocks.1``, ConvNeXt ``stages.0.blocks``, RegNet ``s1``), and
    student block i of a stage with L_S blocks pairs with teacher block
    ceil((i+1) L_T / L_S) - 1 of the same stage, same path inside it. A module outside any block
    (stem, head) pairs with the teacher module of the same name. Returns name -> name or None."""
    s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())

    def partner(name: str) -> str | None:
        found = _block_of(s_mods, name)
        if found is None:
            return name if name in t_mods else None
        container, child, post = found
        t_cont = t_mods.get(container)
        if not _is_block_container(t_cont):
            return None
        s_keys = [k for k, _ in s_mods[container].named_children()]
        t_keys = [k for k, _ in t_cont.named_children()]
        t_name = f"{container}.{t_keys[teacher_layer(s_keys.index(child), len(s_keys), len(t_keys))]}.{post}"
        return t_name if t_name in t_mods else None

    return partner


def _is_block_container(module) -> bool:
    from torch import nn

    if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) == 0:
        return False
    return len({type(child) for child in module.children()}) == 1


def _block_of(modules: dict, name: str) -> tuple[str, str, str] | None:
    """(container path, block key, path inside the block) of the deepest block container holding
    ``name``; None when no ancestor is one."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):
        container = ".".join(parts[:i])
        if _is_block_container(modules.get(container)):
            return container, parts[i], ".".join(parts[i + 1:])
    return None
