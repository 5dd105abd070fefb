"""The run directory of `tdkd distill`: its layout, preparing or resuming it, full-state
checkpoints (save, list, validate, restore), metrics.jsonl and run.json.

    run.json                  what this run is (tdkd version, world size, status, layer map, core pairs)
    recipe.yaml               the resolved recipe (defaults < recipe file < command line)
    metrics.jsonl             averaged loss terms every log_every steps, dev metrics at each evaluation
    checkpoints/step-NNNNNNN/ full state: model (tdkd.json + model.safetensors, usable by merge and
                              eval), trainer_state.safetensors (optimizer moments, RNG states,
                              connectors) and trainer_state.json (progress, checksums)
    best/                     the model at the best dev metric (model files only)

Every directory is written to a temporary sibling and renamed into place, so a killed run never
leaves a half-written checkpoint under a final name, and each records checksums of its tensors.
Optimizer state is stored as tensors (never pickled). ``Progress`` is what trainer_state.json
records of a run (step, best dev result, timing) and what resume restores.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..io import checkpoint as ckpt
from ..io import model_files
from ..tensor import tensorize
from .distributed import Dist
from ..core.errors import CheckpointError, OutputError, UsageError

RUN_FILE = "run.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_FORMAT = "tdkd-train-state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Preparing and describing the directory
# ----------------------------------------------------------------------------------------------
def prepare(out: Path, resume: bool, force: bool, dist: Dist) -> str | None:
    """Check that ``out`` can be started (or resumed); --force deletes only a tdkd run directory.
    A run directory that holds no model yet (a start that failed before its first checkpoint) is
    replaced without --force; returns a note saying so."""
    out = Path(out)
    if resume and force:
        raise UsageError("--resume and --force contradict each other (continue the run, or replace it?)")
    note = None
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"output {out} is a file; expected a run directory")
        is_run = (out / RUN_FILE).is_file()
        if resume:
            if not is_run:
                raise UsageError(f"{out} is not a tdkd run directory (no {RUN_FILE}); nothing to resume")
            return None
        if not force and is_run and not holds_models(out):
            force, note = True, f"replacing {out}: an earlier start stopped before its first checkpoint"
        if not force:
            raise UsageError(f"output {out} already exists; pass --resume to continue that run or --force to replace it")
        if not is_run and any(out.iterdir()):
            raise UsageError(f"--force refuses to delete {out}: it is not a tdkd run directory (no {RUN_FILE})")
        if dist.main:
            shutil.rmtree(out)
        dist.barrier()
    elif resume:
        raise UsageError(f"{out} does not exist; nothing to resume (drop --resume to start a run)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"parent directory {parent} of the output does not exist")
    return note


def holds_models(out: Path) -> bool:
    """Whether a run directory has anything worth keeping: a checkpoint, best/ or members/."""
    out = Path(out)
    return bool(checkpoint_dirs(out)) or (out / "best").exists() or (out / MEMBERS_DIR).exists()


def read_recipe(out: Path) -> dict:
    """The stored recipe.yaml of a run, as a mapping (safe_load)."""
    import yaml

    path = Path(out) / RECIPE_FILE
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path}: {type(exc).__name__}") from None


def write_run_info(out: Path, info: dict, recipe_text: str, start_step: int) -> None:
    """run.json (and, for a new run, recipe.yaml: both created at once or not at all); on resume,
    clear a killed run's temporaries and metrics logged after the checkpoint resumed from."""
    run_json = json.dumps(info, indent=1) + "\n"
    if not out.exists():
        with ckpt.atomic_dir(out, what="run directory") as tmp:
            (tmp / RECIPE_FILE).write_text(recipe_text)
            (tmp / RUN_FILE).write_text(run_json)
    else:
        ckpt.atomic_write_text(out / RUN_FILE, run_json, what="run info")
        _remove_stale_temporaries(out)
    _trim_metrics(out / METRICS_FILE, start_step)


def mark_finished(out: Path) -> None:
    info = json.loads((out / RUN_FILE).read_text())
    info["status"] = "finished"
    ckpt.atomic_write_text(out / RUN_FILE, json.dumps(info, indent=1) + "\n", what="run info")


def drop_checkpoints(out: Path) -> None:
    """keep_best_only: a finished run keeps best/ (and members/, logs), not its full checkpoints."""
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)


def append_metrics(out: Path, rec: dict) -> None:
    """One record more in metrics.jsonl; a failed write is cut back off (no partial line stays)."""
    path = Path(out) / METRICS_FILE
    size = path.stat().st_size if path.exists() else 0
    try:
        with ckpt.writing("metrics", path), open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
    except BaseException:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise


TENSORBOARD_DIR = "tensorboard"
SPECTRA_FILE = "spectra-init.json"


def spectra_layers(names: list[str], count: int = 4) -> list[str]:
    """The MPO layers whose bond spectra a run records: the first and the last ones, model order."""
    return names if len(names) <= count else names[: count // 2] + names[-(count - count // 2):]


def write_init_spectra(out: Path, model) -> None:
    """Singular values at every bond of a few MPO layers before training (``tdkd report`` draws
    them beside those of the trained cores)."""
    from ..tensor import mpo

    modules = tensorize.mpo_modules(model)
    if not modules:
        return
    layers = {}
    for name in spectra_layers(list(modules)):
        with torch.no_grad():
            cores = [c.detach().cpu() for c in tensorize.layer_cores(modules[name])]
            layers[name] = [[round(float(v), 8) for v in sv] for sv in mpo.bond_spectra(cores)]
    ckpt.atomic_write_text(Path(out) / SPECTRA_FILE, json.dumps({"step": 0, "layers": layers}) + "\n", what="bond spectra")


class MetricsLog:
    """metrics.jsonl, and with ``tensorboard`` the same records as TensorBoard scalars under
    RUN/tensorboard/: a training record's terms as ``train/<key>`` (lr and examples_per_s
    included), an evaluation's metrics as ``eval/<metric>``, at the record's step. On resume,
    events after ``start_step`` left by the interrupted invocation are discarded (purge_step)."""

    def __init__(self, out: Path, tensorboard: bool = False, start_step: int = 0):
        self.out = Path(out)
        self.writer = None
        if tensorboard:
            self.writer = tensorboard_writer(self.out / TENSORBOARD_DIR, start_step)

    def append(self, rec: dict) -> None:
        append_metrics(self.out, rec)
        if self.writer is None:
            return
        step = int(rec["step"])
        if "eval" in rec:
            for k, v in rec["eval"].items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"eval/{k}", v, step)
        else:
            for k, v in rec.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def check_tensorboard() -> None:
    """tensorboard is an optional dependency: a clear error without it."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'tdkd[tensorboard]')") from None


def tensorboard_writer(log_dir: Path, start_step: int):
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step or None)


def _remove_stale_temporaries(out: Path) -> None:
    """Half-written directories of a killed run (``.NAME.tmp-*``, never under a final name)."""
    for d in (out, out / "checkpoints"):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
            keep.append(line)
    ckpt.atomic_write_text(path, "".join(k + "\n" for k in keep), what="metrics")


# ----------------------------------------------------------------------------------------------
# Disk space: what the run's outputs will take, checked before training
# ----------------------------------------------------------------------------------------------
def _tensors_bytes(state: dict) -> int:
    """Bytes of a state dict in a safetensors file: the data plus a header entry per tensor."""
    return sum(t.numel() * t.element_size() + 80 + len(k) for k, t in state.items())


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, nn.Module],
                     tok_dir: Path | None, world: int) -> tuple[int, int]:
    """(one full checkpoint, one model-only directory such as best/), estimated from the state that
    will be saved: the model's tensors (MPO cores, not the dense weights they make), AdamW's two
    moments and step per trained parameter, connectors and scheme extras, RNG states, tokenizer
    files and the JSON files."""
    model_b = _tensors_bytes(model.state_dict())
    tok_b = sum((Path(tok_dir) / f).stat().st_size for f in ckpt.TOKENIZER_FILES
                if tok_dir is not None and (Path(tok_dir) / f).is_file())
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    optim_b = sum(2 * p.numel() * p.element_size() + 4 + 3 * 100 for p in params)
    extras_b = sum(_tensors_bytes(m.state_dict()) for m in saved.values())
    rng_b = world * (torch.get_rng_state().numel() + 100)
    json_b = 16 * 1024
    model_dir = model_b + tok_b + json_b
    return model_dir + optim_b + extras_b + rng_b, model_dir


def disk_plan(out: Path, full: int, model_dir: int, keep_last: int, members: int = 0, cache: int = 0) -> dict:
    """The run's peak disk use and the free space where it will write. Peak: keep_last full
    checkpoints plus the one being written before the oldest is removed, best/ twice while it is
    replaced, the members of an online scheme, and the teacher cache when it shares the file system."""
    peak = (keep_last + 1) * full + 2 * model_dir + members * model_dir + cache
    existing = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) if Path(out).is_dir() else 0
    return {"checkpoint_bytes": full, "best_bytes": model_dir, "peak_bytes": peak, "cache_bytes": cache,
            "needed_bytes": max(0, peak - existing), "free_bytes": ckpt.free_bytes(out), "keep_last": keep_last}


def check_space(out: Path, plan: dict) -> None:
    """Stop before training when the run's outputs cannot fit (OutputError, exit 3)."""
    if plan["free_bytes"] >= plan["needed_bytes"]:
        return
    h = ckpt.human_bytes
    cache = f" + teacher cache {h(plan['cache_bytes'])}" if plan["cache_bytes"] else ""
    raise OutputError(f"not enough disk space for run {out}: {h(plan['free_bytes'])} free, about {h(plan['needed_bytes'])} "
                      f"needed (checkpoints of {h(plan['checkpoint_bytes'])} each: keep_last {plan['keep_last']} + 1 while the "
                      f"next is written, best/ {h(plan['best_bytes'])} x 2{cache}); free space, lower it with --keep-last 1"
                      f"{' or --no-teacher-cache' if cache else ''}, or write the run to a larger disk (-o)")


def resume_hint(out: Path) -> str:
    """What a run stopped by a write failure still has, and the command that continues it."""
    found = latest_complete(out)
    if found is None and not holds_models(out):
        return "no checkpoint was written yet; after freeing space, run the same command again"
    if found is None:
        return f"no full checkpoint yet; after freeing space, continue with: tdkd distill -o {out} --resume (from step 0)"
    return (f"last complete checkpoint: {found[0]} (step {found[1]['step']}); after freeing space, continue with: "
            f"tdkd distill -o {out} --resume")


# ----------------------------------------------------------------------------------------------
# Finding and validating checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    d = Path(out) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[5:]))


def check_complete(path: Path) -> dict:
    """trainer_state.json of a full-state checkpoint, after checking that every file it lists is
    there with the recorded checksum. Raises CheckpointError otherwise."""
    sj = path / STATE_JSON
    try:
        state = json.loads(sj.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {STATE_JSON} ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: {STATE_JSON} is not a tdkd trainer state")
    if state.get("format_version", 0) > STATE_VERSION:
        raise CheckpointError(f"{path}: trainer state version {state.get('format_version')} is newer than this tdkd")
    files = state.get("files")
    if not isinstance(files, dict) or STATE_TENSORS not in files or ckpt.TENSORS not in files:
        raise CheckpointError(f"{path}: {STATE_JSON} lists no checksums")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if ckpt.sha256_file(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt)")
    ckpt.read_manifest(path)
    return state


def latest_complete(out: Path, on_skip: Callable[[str], None] | None = None) -> tuple[Path, dict] | None:
    for p in reversed(checkpoint_dirs(out)):
        try:
            return p, check_complete(p)
        except CheckpointError as exc:
            if on_skip:
                on_skip(f"skipping damaged checkpoint {p.name}: {exc}")
    return None


# ----------------------------------------------------------------------------------------------
# Full state: save and restore
# ----------------------------------------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"optim.{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], where: Path) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    n_params = sum(len(g["params"]) for g in sd["param_groups"])
    if any(pid >= n_params for pid in state):
        raise CheckpointError(f"{where}: optimizer state does not fit this model")
    try:
        opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{where}: optimizer state does not fit this model ({exc})") from None


def save_full(out: Path, step: int, model: nn.Module, source: dict, tok_dir: Path | None, n: int | None,
              optimizer: torch.optim.Optimizer, connectors: dict[str, nn.Module], rng: dict, state: dict) -> Path:
    """checkpoints/step-N: the model as a tdkd checkpoint, optimizer moments, RNG states and
    connector weights as tensors, and ``state`` (the run's progress) with checksums."""
    path = out / "checkpoints" / f"step-{step:07d}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with ckpt.atomic_dir(path, force=True, what="checkpoint") as tmp:
        model_files.write_model_files(tmp, model, source, tok_dir, n=n, extra={"trained_by": "tdkd distill", "step": step})
        tensors = dict(optimizer_tensors(optimizer))
        tensors.update(rng)
        for prefix, module in connectors.items():
            for k, v in module.state_dict().items():
                tensors[f"{prefix}.{k}"] = v
        ckpt.save_tensors(tensors, tmp / STATE_TENSORS, metadata={"format": STATE_FORMAT})
        state = {"format": STATE_FORMAT, "format_version": STATE_VERSION, **state,
                 "files": {STATE_TENSORS: ckpt.sha256_file(tmp / STATE_TENSORS), ckpt.TENSORS: ckpt.sha256_file(tmp / ckpt.TENSORS)}}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
    return path


def save_best(out: Path, model: nn.Module, source: dict, tok_dir: Path | None, best: dict) -> None:
    with ckpt.atomic_dir(out / "best", force=True, what="best model") as tmp:
        model_files.write_model_files(tmp, model, source, tok_dir, n=None,
                                      extra={"trained_by": "tdkd distill", "step": best["step"], "best": best})


MEMBERS_DIR = "members"


def save_member(out: Path, name: str, model: nn.Module, source: dict, tok_dir: Path | None, step: int) -> None:
    """members/NAME/: one member of an online scheme (a DML peer, a ONE branch) as model files."""
    (out / MEMBERS_DIR).mkdir(exist_ok=True)
    with ckpt.atomic_dir(out / MEMBERS_DIR / name, force=True, what="member model") as tmp:
        model_files.write_model_files(tmp, model, source, tok_dir, n=None,
                                      extra={"trained_by": "tdkd distill", "step": step, "member": name})


def restore(cdir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, connectors: dict[str, nn.Module],
            dist: Dist, device: str) -> None:
    """Load a full-state checkpoint into this process's model, optimizer, connectors and RNG."""
    manifest, tensors = ckpt.load_mpo_checkpoint(cdir)
    if set(manifest["layers"]) != set(tensorize.mpo_modules(model)):
        raise CheckpointError(f"{cdir}: its MPO layers differ from this run's student")
    model_files.load_checkpoint_tensors(model, tensors, cdir, "the student")
    st = ckpt.load_tensors(cdir / STATE_TENSORS)
    load_optimizer_tensors(optimizer, {k: v.to(device) if k.startswith("optim.") and v.ndim > 0 else v for k, v in st.items()}, cdir)
    for prefix, module in connectors.items():
        module.load_state_dict({k[len(prefix) + 1:]: v for k, v in st.items() if k.startswith(prefix + ".")})
    rng = st.get(f"rng.cpu.{dist.rank}")
    if rng is None:
        raise CheckpointError(f"{cdir}: no RNG state for process {dist.rank}")
    torch.set_rng_state(rng)
    cuda = st.get(f"rng.cuda.{dist.rank}")
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------------------------
# Progress: what a checkpoint records and resume restores
# ----------------------------------------------------------------------------------------------
class Progress:
    """Step, best dev result, last evaluation and training time of a run, across invocations."""

    def __init__(self, seed: int, world_size: int, total_steps: int, steps_per_epoch: int, metric: str | None):
        self.meta = {"seed": seed, "world_size": world_size, "total_steps": total_steps}
        self.steps_per_epoch = steps_per_epoch
        self.step = 0
        self.best = {"metric": metric, "value": None, "step": None}
        self.last_eval: dict = {}
        self.prior_seconds, self.prior_steps = 0.0, 0  # earlier invocations: time and the steps it covers
        self.start_step, self._t0 = 0, time.perf_counter()
        self.loss_scale: dict | None = None  # fp16 loss scaler state (precision.scaler)

    def start_clock(self) -> None:
        self.start_step, self._t0 = self.step, time.perf_counter()

    def train_seconds(self) -> float:
        return self.prior_seconds + time.perf_counter() - self._t0

    def timed_steps(self) -> int:
        return self.prior_steps + self.step - self.start_step

    def record_eval(self, metrics: dict, metric: str) -> bool:
        """Note an evaluation; True when it is the best so far."""
        self.last_eval = metrics
        value = metrics[metric]
        improved = self.best["value"] is None or value > self.best["value"]
        if improved:
            self.best = {"metric": metric, "value": value, "step": self.step}
            if "member" in metrics:  # an online scheme: which peer or branch
                self.best["member"] = metrics["member"]
        return improved

    def state_dict(self) -> dict:
        state = dict(self.meta, step=self.step, best=self.best, epoch=self.step // self.steps_per_epoch,
                     last_eval=self.last_eval, train_seconds=round(self.train_seconds(), 3), timed_steps=self.timed_steps())
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.best = state.get("best", self.best)
        self.prior_seconds = float(state.get("train_seconds", 0.0))
        self.last_eval = dict(state.get("last_eval") or {})
        self.prior_steps = int(state.get("timed_steps", 0))  # 0: a checkpoint older than this field
        self.loss_scale = state.get("loss_scale")
