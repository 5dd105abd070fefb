"""tdkd checkpoints as models: write a (possibly tensorized) model in tdkd's format, and load any
model tdkd understands (an MPO checkpoint rebuilt from its manifest, or whatever ``models`` loads).

The format itself (manifest validation, safetensors checks, atomic directories) is checkpoint.py;
this module connects it to model objects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.version import __version__
from . import checkpoint as ckpt
from . import models
from ..tensor import tensorize
from ..core.errors import CheckpointError


def dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


def write_model_files(directory: Path, model, source: dict, tokenizer_dir: Path | None, *, n: int | None = None,
                      rank: int | None = None, extra: dict | None = None) -> list[str]:
    """Write a model in tdkd's checkpoint format into ``directory``: model.safetensors (cores under
    ``<layer>.mpo_core.<k>``, every other tensor under its state_dict name), the tdkd.json
    manifest, and tokenizer files. A model without MPO layers gives a manifest with no layers.
    Returns the tokenizer files copied."""
    directory = Path(directory)
    modules = tensorize.mpo_modules(model)
    tensors = {}
    for key, value in model.state_dict().items():
        if ".parametrizations.weight.original" in key:
            continue
        tensors[key] = value
    layers = {}
    for name, module in modules.items():
        plan = tensorize.layer_plan(module)
        cores = tensorize.layer_cores(module)
        for k, c in enumerate(cores):
            tensors[ckpt.core_key(name, k)] = c
        layers[name] = {"out_features": plan.out_features, "in_features": plan.in_features,
                        "out_shape": list(plan.out_shape), "in_shape": list(plan.in_shape),
                        "bonds": [1] + [int(c.shape[-1]) for c in cores], "central": plan.central,
                        "dtype": dtype_name(cores[0])}
        if plan.weight_shape != (plan.out_features, plan.in_features):
            layers[name]["weight_shape"] = list(plan.weight_shape)  # a Conv2d: (out, in/groups, kh, kw)
    ckpt.save_tensors(tensors, directory / ckpt.TENSORS, metadata={"format": "pt", "tdkd": ckpt.FORMAT})
    manifest = {
        "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION, "tdkd_version": __version__,
        "source": dict(source), "n": n, "rank": rank,
        "tensors": {"file": ckpt.TENSORS, "sha256": ckpt.sha256_file(directory / ckpt.TENSORS)},
        "layers": layers,
    }
    if extra:
        manifest.update(extra)
    (directory / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return ckpt.copy_tokenizer_files(tokenizer_dir, directory)


def load_checkpoint_tensors(model, tensors: dict, where: Path, what: str = "the model") -> None:
    """Load a tdkd checkpoint's tensors into a model tensorized with the same layers (strict)."""
    state = {tensorize.parametrized_key(k): v for k, v in tensors.items()}
    models.load_state_strict(model, state, f"{where}: tensors do not fit {what}")


def load_mpo_model(path: Path):
    """(Loaded, manifest) for an MPO checkpoint directory: architecture rebuilt from the manifest,
    cores attached, all tensors loaded with strict key checking."""
    import torch

    manifest, tensors = ckpt.load_mpo_checkpoint(Path(path))
    where = Path(path) / ckpt.MANIFEST
    _check_source_fits(manifest, tensors, where)
    model = models.build_from_source(manifest["source"], where=where)
    modules = dict(model.named_modules())
    plans = []
    for name, L in manifest["layers"].items():
        mod = modules.get(name)
        w_shape = ckpt.layer_weight_shape(L)
        kind = "Linear" if len(w_shape) == 2 else "Conv2d"
        if not isinstance(mod, tensorize.linear_types() if kind == "Linear" else torch.nn.Conv2d) or tuple(mod.weight.shape) != w_shape:
            raise CheckpointError(f"{path}: layer {name} is not a {'x'.join(map(str, w_shape))} {kind} of the model")
        plans.append(tensorize.LayerPlan(name, L["out_features"], L["in_features"], tuple(L["out_shape"]),
                                         tuple(L["in_shape"]), None, list(L["bonds"]), w_shape))
    tensorize.tensorize(model, plans, empty=True)
    state_keys = {tensorize.parametrized_key(k) for k in tensors}
    expected = set(model.state_dict().keys())
    missing = sorted(expected - state_keys)
    unexpected = sorted(state_keys - expected)
    # HF models may hold non-persistent or tied entries; only tensors the model declares matter.
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} ({len(missing)} in all)")
    load_checkpoint_tensors(model, tensors, Path(path))
    tok = Path(path) if any((Path(path) / f).is_file() for f in ckpt.TOKENIZER_FILES) else None
    return models.Loaded(model.eval(), manifest["source"]["family"], manifest["source"], tok), manifest


def _check_source_fits(manifest: dict, tensors: dict, where: Path) -> None:
    """Build the manifest's architecture on the meta device (no memory) and compare its tensor
    shapes with the checkpoint's, so that a damaged source block (say a size of 10**9) is refused
    before a real model of that size is allocated."""
    import torch

    _check_repeat_counts(manifest["source"], tensors, where)
    with torch.device("meta"):
        skeleton = models.build_from_source(manifest["source"], where=where)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for name, L in manifest["layers"].items():
        implied = shapes.pop(f"{name}.weight", None)
        w_shape = ckpt.layer_weight_shape(L)
        if implied is not None and implied != w_shape:
            raise CheckpointError(f"{where}: source describes {name}.weight as {list(implied)}, "
                                  f"its layer entry as {list(w_shape)}")
    for key, shape in shapes.items():
        stored = tensors.get(key)
        if stored is not None and tuple(stored.shape) != shape:
            raise CheckpointError(f"{where}: source describes {key} as {list(shape)}, the checkpoint holds {list(stored.shape)}")


# Fields that set how many times a module is repeated: building even on the meta device costs time
# per module, so a damaged count (10**9 layers) would never finish. Each repeated module holds at
# least one stored tensor, so a count above the number of stored tensors cannot be this checkpoint.
_REPEAT_KEY = re.compile(r"(layers?$|^n_layer|experts|blocks$|^depths?$)")


def _check_repeat_counts(source: dict, tensors: dict, where: Path) -> None:
    fields = source.get("config") if source.get("family") == "hf" else source.get("kwargs")
    label = "source.config" if source.get("family") == "hf" else "source.kwargs"
    for key, value in (fields or {}).items():
        if not isinstance(key, str) or not _REPEAT_KEY.search(key):
            continue
        counts = value if isinstance(value, (list, tuple)) else [value]
        total = sum(v for v in counts if isinstance(v, int) and not isinstance(v, bool))
        if total > len(tensors):
            raise CheckpointError(f"{where}: {label}.{key} asks for {total} repeated modules, "
                                  f"the checkpoint holds only {len(tensors)} tensors")
    labels = (fields or {}).get("num_labels") if source.get("family") == "hf" else (fields or {}).get("num_classes")
    elements = sum(int(t.numel()) for t in tensors.values())
    if isinstance(labels, int) and not isinstance(labels, bool) and labels > elements:
        raise CheckpointError(f"{where}: {label} asks for {labels} output classes, "
                              f"the checkpoint holds only {elements} numbers")


def load_any(spec: str, *, init: str = "pretrained", num_labels: int | None = None, weights: str | None = None,
             seed: int = 0, trust_remote_code: bool = False, keep_head: bool = False,
             graph_features: int | None = None) -> models.Loaded:
    """Any model tdkd understands: an MPO checkpoint directory, or whatever models.load_model takes.
    ``keep_head``: a local directory keeps its own classifier head (``num_labels`` is ignored for
    it), as a teacher must."""
    p = Path(spec).expanduser()
    if p.is_dir() and ckpt.detect_kind(p) == "mpo":
        return load_mpo_model(p)[0]
    if keep_head and (p.is_dir() or models.looks_like_path(spec)):
        num_labels = None
    return models.load_model(spec, weights=weights, init=init, num_labels=num_labels,
                             trust_remote_code=trust_remote_code, seed=seed, graph_features=graph_features)
