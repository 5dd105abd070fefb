"""`tdkd distill`: set a run up, single process or torchrun/DDP, and train it (loop.py).

One run, in order (each step a function below or a module of its own):

    run_dir.prepare         the output directory (new, --force, or --resume with the stored recipe)
    training_data.load      train/dev splits of the task or image folder
    pair.setup              teacher and student: loaded, checked, cut, over-parameterized; layer map;
                            teacher cores for the tensor constraint
    training_data.prepare   tokenized once; batches of each epoch
    online.setup            the scheme: the student alone, or online KD (DML peers, ONE branches)
                            or module replacement (Theseus), see scheme.py
    _setup_models           devices, frozen teacher, connectors (e.g. the hidden-state projection)
    _setup_methods          the recipe's distillation methods bound to the models (binding.bind)
    optim.setup             AdamW (or Adam) with a separate learning rate for MPO cores (optim.py)
    _setup_progress         fresh, or restored from the latest complete checkpoint
    loop.Training.train     loss step -> optimizer step -> after step (log, evaluate, keep the best,
                            save) until the last step; Ctrl-C saves and exits 130

The loss is a weighted sum of named terms (loss_terms.TERMS); the run directory's layout and
checkpoint format are run_dir's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.version import __version__
from . import distributed, optim, run_dir, teacher_cache, training_data
from ..io import checkpoint as ckpt
from ..methods import binding, loss_terms, registry as methods
from ..methods.schemes import online
from ..io import graphs, pair as pair_mod
from ..core import recipe as recipe_mod
from ..tensor import tensorize
from .distributed import Dist
from ..core.errors import OutputError, UsageError
from ..methods.features import FeatureTap
from .loop import Training
from ..core.reporting import Reporter
from ..io.pair import Pair
from ..core.recipe import Recipe
from .run_dir import Progress
from ..methods.schemes.base import Scheme

__all__ = ["run", "Reporter", "Progress"]


# ----------------------------------------------------------------------------------------------
# Setup steps
# ----------------------------------------------------------------------------------------------
def _setup_recipe(r: Recipe, out: Path, resume: bool, force: bool, explicit: set[str],
                  reporter: Reporter) -> tuple[Recipe, str, Dist]:
    if not resume and graphs.is_graph_data(r.data):  # a GCN's setting unless the user set it
        r = recipe_mod.with_graph_defaults(r, explicit, not pair_mod.no_teacher(r.teacher))
    if not resume:
        recipe_mod.check_ranges(r)
        methods.parse_all(r.methods)  # a bad method spec is a usage error before anything happens
    if r.tensorboard:
        run_dir.check_tensorboard()  # before the run directory is touched
    device, dist = distributed.setup(r.device)
    if not resume:
        online.check(r, dist.world)
    note = run_dir.prepare(out, resume, force, dist)
    if note and dist.main:
        reporter.info(note)
    if resume:
        r = recipe_mod.for_resume(run_dir.read_recipe(out), r, explicit, f"{out}/{run_dir.RECIPE_FILE}")
        online.check(r, dist.world)
        device = distributed.resolve_device(r.device) if dist.world == 1 else device
    return r, device, dist


def _check_teacher_needs(r: Recipe) -> None:
    """Without a teacher, only terms and methods that need none (online schemes) can run."""
    if not pair_mod.no_teacher(r.teacher):
        return
    loss_methods = [s for s in methods.parse_all(r.methods) if s.method.kind not in methods.TRAINING_SCHEMES]
    if r.tensor_lambda > 0 or r.hidden_weight > 0 or r.attention_weight > 0 or r.layer_map or loss_methods:
        raise UsageError("hidden_weight, attention_weight, tensor_lambda, layer_map and methods need a teacher (teacher is 'none')")


def _setup_models(pair: Pair, r: Recipe, device: str, scheme: Scheme) -> dict[str, nn.Module]:
    """Move the pair to the device (student and the scheme's extras training, teacher frozen in
    eval mode); return the connectors the loss terms train with the student."""
    pair.student.model.to(device).train()
    for module in scheme.extras.values():
        module.to(device).train()
    if pair.teacher is not None:
        pair.teacher.model.to(device).eval()
        for p in pair.teacher.model.parameters():
            p.requires_grad_(False)
    pair.teacher_cores = {k: [c.to(device) for c in v] for k, v in pair.teacher_cores.items()}
    connectors = {}
    if r.hidden_weight > 0:
        sw, tw = int(pair.student.model.config.hidden_size), int(pair.teacher.model.config.hidden_size)
        if sw != tw:
            torch.manual_seed(r.seed)
            connectors["projection"] = nn.Linear(sw, tw).to(device)
    return connectors


def _setup_methods(pair: Pair, r: Recipe, batches: training_data.Batches, device: str) -> binding.Bound:
    """Bind the recipe's methods to the models (binding.bind): feature shapes come from one
    forward pass of each model, in eval mode and without gradients, on the first batch."""
    if not r.methods or pair.teacher is None:  # without a teacher only online methods (online.py) are allowed
        return binding.Bound()

    def probe(s_paths: list[str], t_paths: list[str]) -> tuple[dict, dict]:
        batch = batches.batch(batches.indices(0, 0), pair.student.model, device)
        shapes = []
        for role, loaded, paths in (("student", pair.student, s_paths), ("teacher", pair.teacher, t_paths)):
            model = loaded.model
            was_training = model.training
            with FeatureTap(model, paths, role) as tap, torch.no_grad():
                model.eval()
                loss_terms.forward(model, loaded.family, batch)
                shapes.append({p: tuple(v.shape) for p, v in tap.features.items()})
            model.train(was_training)
        return shapes[0], shapes[1]

    bound = binding.bind(r.methods, pair.student.model, pair.teacher.model, pair.layer_map, probe, r.seed,
                         n_examples=batches.n_train, batch_size=len(batches.indices(0, 0)))
    for module in bound.connectors.values():
        module.to(device).train()
    return bound


def _setup_progress(out: Path, resume: bool, progress: Progress, model, optimizer, connectors, dist: Dist, device: str,
                    seed: int, reporter: Reporter) -> None:
    """Restore the latest complete checkpoint on --resume; otherwise seed this process's RNG."""
    found = run_dir.latest_complete(out, reporter.info) if resume else None
    if found is None:
        if resume:
            reporter.info("no complete checkpoint yet: starting from step 0")
        torch.manual_seed(seed + dist.rank)
        return
    cdir, state = found
    if state.get("world_size") != dist.world:
        raise UsageError(f"{cdir} was written by {state.get('world_size')} processes; resume with the same number")
    run_dir.restore(cdir, model, optimizer, connectors, dist, device)
    progress.load_state_dict(state)
    reporter.info(f"resuming from {cdir} (step {progress.step} of {progress.meta['total_steps']})")


def _wrap_ddp(model: nn.Module, dist: Dist, device: str) -> nn.Module:
    if dist.world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[dist.local_rank] if device.startswith("cuda") else None, broadcast_buffers=False)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def run(r: Recipe, out: Path, *, resume: bool = False, force: bool = False, reporter: Reporter | None = None,
        argv: list[str] | None = None, explicit: set[str] | None = None) -> dict | None:
    """Train. ``explicit`` names the keys the user set (recipe file or command line): with
    ``resume`` those must agree with the run's stored recipe. Returns the summary on the main
    process (None on the others)."""
    try:
        training, notes = prepare(r, out, resume=resume, force=force, reporter=reporter, argv=argv, explicit=explicit)
        training.train()
    except OutputError as exc:  # a write failed: say what the run still has and how to continue it
        raise OutputError(f"{exc}; {run_dir.resume_hint(Path(out))}") from None
    if not training.dist.main:
        return None
    return dict(_summary(training, training.pair, training.ds, training.batches), connectors=notes, disk=training.disk)


def prepare(r: Recipe, out: Path, *, resume: bool = False, force: bool = False, reporter: Reporter | None = None,
            argv: list[str] | None = None, explicit: set[str] | None = None) -> tuple["Training", list[str]]:
    """Every setup step of a run, up to the first training step: the ``Training`` (its run
    directory written) and the connector notes for the summary."""
    reporter = reporter or Reporter()
    out = Path(out)
    r, device, dist = _setup_recipe(r, out, resume, force, set(recipe_mod.KEYS) if explicit is None else set(explicit),
                                    reporter)
    if not dist.main:
        reporter = Reporter()
    torch.manual_seed(r.seed)
    ds = training_data.load(r, reporter.info)
    _check_teacher_needs(r)
    features = int(ds.train.x.shape[1]) if ds.kind == "graph" else None
    pair = pair_mod.setup(r, ds.num_labels, reporter, cut=online.successor_cut(r), graph_features=features)
    tok_dir = pair.tokenizer_dir(r.tokenizer) if ds.kind == "text" else None
    vocab = int(getattr(getattr(pair.student.model, "config", None), "vocab_size", 0))
    batches = training_data.prepare(ds, r, tok_dir, vocab, dist, reporter.info)
    total = batches.total_steps(r.epochs, r.max_steps)
    scheme = online.setup(r, pair, ds.num_labels, reporter, lambda: batches.batch(batches.indices(0, 0), pair.student.model, "cpu"))
    model = pair.student.model
    connectors = _setup_models(pair, r, device, scheme)
    bound = _setup_methods(pair, r, batches, device)
    connectors.update(bound.connectors)
    optimizer, base_lrs = optim.setup(model, connectors, r, tuple(scheme.extras.values()))
    disk = _check_disk(out, r, model, optimizer, {**connectors, **scheme.extras}, tok_dir, dist, ds, batches, pair, scheme)
    reporter.info(_disk_line(disk))
    fwd_model = _wrap_ddp(model, dist, device)
    progress = Progress(r.seed, dist.world, total, batches.steps_per_epoch, ds.metric)
    _setup_progress(out, resume, progress, model, optimizer, {**connectors, **scheme.extras}, dist, device, r.seed, reporter)
    training = Training(r, out, dist, device, reporter, ds, pair, batches, fwd_model, connectors, optimizer, base_lrs,
                        total, progress, tok_dir, bound.terms, scheme)  # checks the module paths loss terms read: before anything is written
    training.disk = disk
    if dist.main:
        run_dir.write_run_info(out, _run_info(dist, device, argv, total, ds, pair, scheme), recipe_mod.dump(r), progress.step)
        if progress.step == 0:
            run_dir.write_init_spectra(out, model)
    dist.barrier()
    return training, bound.notes


def _check_disk(out: Path, r: Recipe, model, optimizer, saved: dict, tok_dir, dist: Dist, ds, batches, pair: Pair,
                scheme: Scheme) -> dict:
    """The run's disk plan (run_dir.disk_plan), refused before anything is written when it cannot fit."""
    full, model_dir = run_dir.checkpoint_bytes(model, optimizer, saved, tok_dir, dist.world)
    cache = 0
    if r.teacher_cache and pair.teacher is not None and dist.world == 1 and _same_disk(out, teacher_cache.cache_dir()):
        cache = batches.n_train * (ds.num_labels * 4 + 1)  # logits (features, when cached, come on top)
    plan = run_dir.disk_plan(out, full, model_dir, r.keep_last, len(scheme.members()), cache)
    if dist.main:
        run_dir.check_space(out, plan)
    return plan


def _same_disk(a: Path, b: Path) -> bool:
    return ckpt.existing_ancestor(a).stat().st_dev == ckpt.existing_ancestor(b).stat().st_dev


def _disk_line(plan: dict) -> str:
    h = ckpt.human_bytes
    return (f"disk: a checkpoint takes about {h(plan['checkpoint_bytes'])}, the run at most about {h(plan['peak_bytes'])} "
            f"(keep_last {plan['keep_last']}); {h(plan['free_bytes'])} free")


def _run_info(dist: Dist, device: str, argv, total: int, ds, pair: Pair, scheme: Scheme) -> dict:
    info = {
        "format": "tdkd-run", "tdkd_version": __version__, "world_size": dist.world, "device": device,
        "argv": argv, "status": "running", "total_steps": total, "data": str(ds.path),
        "layer_map": pair.layer_map,
        "tensor_constraint": [{"student": p.student, "teacher": p.teacher, "aligned_cores": list(p.cores),
                               "skipped_cores": list(p.skipped)} for p in pair.core_pairs],
    }
    if scheme.method:
        info["scheme"] = scheme.info()
    return info


def _summary(t: "Training", pair: Pair, ds, batches) -> dict:
    model, p = pair.student.model, t.progress
    elapsed, timed = p.train_seconds(), p.timed_steps()  # whole run: earlier invocations + this one
    dirs = run_dir.checkpoint_dirs(t.out)
    return {"output": str(t.out), "steps": t.total, "best": p.best, "final_metrics": p.last_eval,
            "train_seconds": round(elapsed, 3), "steps_run": t.total - p.start_step,
            "seconds_per_step": round(elapsed / timed, 4) if timed else None,
            "checkpoint": str(dirs[-1]) if dirs else None,
            "best_dir": str(t.out / "best"), "world_size": t.dist.world, "device": t.device,
            "params_training": sum(x.numel() for m in (model, *t.scheme.extras.values()) for x in m.parameters()),
            "params_inference": tensorize.dense_param_count(model),
            "train_examples": batches.n_train, "steps_per_epoch": batches.steps_per_epoch, "total_steps": t.total,
            "dev_examples": ds.dev_examples,
            "aligned_cores": sum(len(c.cores) for c in pair.core_pairs),
            "skipped_cores": sum(len(c.skipped) for c in pair.core_pairs),
            "scheme": t.scheme.info() if t.scheme.method else None,
            "members_dir": str(t.out / run_dir.MEMBERS_DIR) if t.scheme.members() else None}
