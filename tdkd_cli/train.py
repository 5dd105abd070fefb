"""`tdkd distill`: the training loop, single process or torchrun/DDP.

One run, in order (each step a function below or a module of its own):

    run_dir.prepare         the output directory (new, --force, or --resume with the stored recipe)
    training_data.load      train/dev splits of the task or image folder
    pair.setup              teacher and student: loaded, checked, cut, over-parameterized; layer map;
                            teacher cores for the tensor constraint
    training_data.prepare   tokenized once; batches of each epoch
    _setup_models           devices, frozen teacher, connectors (e.g. the hidden-state projection)
    _setup_methods          the recipe's distillation methods bound to the models (methods.bind)
    optim.setup             AdamW with a separate learning rate for MPO cores (optim.py)
    _setup_progress         fresh, or restored from the latest complete checkpoint
    Training.train          loss step -> optimizer step -> after step (log, evaluate, keep the best,
                            save) until the last step; Ctrl-C saves and exits 130

The loss is a weighted sum of named terms (loss_terms.TERMS); the run directory's layout and
checkpoint format are run_dir's.
"""

from __future__ import annotations

import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import __version__
from . import distributed, loss_terms, methods, online, optim, pair as pair_mod, precision, recipe as recipe_mod, run_dir, teacher_cache, tensorize, training_data
from .distributed import Dist
from .errors import Interrupted, TrainingDiverged, UsageError
from .evaluate import evaluate_images, evaluate_text
from .features import FeatureTap
from .pair import Pair, Reporter
from .recipe import Recipe
from .run_dir import Progress
from .scheme import Scheme

__all__ = ["run", "Reporter", "Progress"]


# ----------------------------------------------------------------------------------------------
# Setup steps
# ----------------------------------------------------------------------------------------------
def _setup_recipe(r: Recipe, out: Path, resume: bool, force: bool, explicit: set[str]) -> tuple[Recipe, str, Dist]:
    if not resume:
        recipe_mod.check_ranges(r)
        methods.parse_all(r.methods)  # a bad method spec is a usage error before anything happens
    if r.tensorboard:
        run_dir.check_tensorboard()  # before the run directory is touched
    device, dist = distributed.setup(r.device)
    if not resume:
        online.check(r, dist.world)
    run_dir.prepare(out, resume, force, dist)
    if resume:
        r = recipe_mod.for_resume(run_dir.read_recipe(out), r, explicit, f"{out}/{run_dir.RECIPE_FILE}")
        online.check(r, dist.world)
        device = distributed.resolve_device(r.device) if dist.world == 1 else device
    return r, device, dist


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


def _setup_methods(pair: Pair, r: Recipe, batches: training_data.Batches, device: str) -> methods.Bound:
    """Bind the recipe's methods to the models (methods.bind): feature shapes come from one
    forward pass of each model, in eval mode and without gradients, on the first batch."""
    if not r.methods or pair.teacher is None:  # without a teacher only online methods (online.py) are allowed
        return methods.Bound()

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

    bound = methods.bind(r.methods, pair.student.model, pair.teacher.model, pair.layer_map, probe, r.seed)
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
    training, notes = prepare(r, out, resume=resume, force=force, reporter=reporter, argv=argv, explicit=explicit)
    training.train()
    if not training.dist.main:
        return None
    return dict(_summary(training, training.pair, training.ds, training.batches), connectors=notes)


def prepare(r: Recipe, out: Path, *, resume: bool = False, force: bool = False, reporter: Reporter | None = None,
            argv: list[str] | None = None, explicit: set[str] | None = None) -> tuple["Training", list[str]]:
    """Every setup step of a run, up to the first training step: the ``Training`` (its run
    directory written) and the connector notes for the summary."""
    reporter = reporter or Reporter()
    out = Path(out)
    r, device, dist = _setup_recipe(r, out, resume, force, set(recipe_mod.KEYS) if explicit is None else set(explicit))
    if not dist.main:
        reporter = Reporter()
    torch.manual_seed(r.seed)
    ds = training_data.load(r)
    pair = pair_mod.setup(r, ds.num_labels, reporter, cut=online.successor_cut(r))
    tok_dir = pair.tokenizer_dir(r.tokenizer) if ds.kind == "text" else None
    vocab = int(getattr(getattr(pair.student.model, "config", None), "vocab_size", 0))
    batches = training_data.prepare(ds, r, tok_dir, vocab, dist)
    total = batches.total_steps(r.epochs, r.max_steps)
    scheme = online.setup(r, pair, ds.num_labels, reporter, lambda: batches.batch(batches.indices(0, 0), pair.student.model, "cpu"))
    model = pair.student.model
    connectors = _setup_models(pair, r, device, scheme)
    bound = _setup_methods(pair, r, batches, device)
    connectors.update(bound.connectors)
    optimizer, base_lrs = optim.setup(model, connectors, r, tuple(scheme.extras.values()))
    fwd_model = _wrap_ddp(model, dist, device)
    progress = Progress(r.seed, dist.world, total, batches.steps_per_epoch, ds.metric)
    _setup_progress(out, resume, progress, model, optimizer, {**connectors, **scheme.extras}, dist, device, r.seed, reporter)
    training = Training(r, out, dist, device, reporter, ds, pair, batches, fwd_model, connectors, optimizer, base_lrs,
                        total, progress, tok_dir, bound.terms, scheme)  # checks the module paths loss terms read: before anything is written
    if dist.main:
        run_dir.write_run_info(out, _run_info(dist, device, argv, total, ds, pair, scheme), recipe_mod.dump(r), progress.step)
        if progress.step == 0:
            run_dir.write_init_spectra(out, model)
    dist.barrier()
    return training, bound.notes


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
            "dev_examples": len(ds.dev) if ds.dev is not None else 0,
            "aligned_cores": sum(len(c.cores) for c in pair.core_pairs),
            "skipped_cores": sum(len(c.skipped) for c in pair.core_pairs),
            "scheme": t.scheme.info() if t.scheme.method else None,
            "members_dir": str(t.out / run_dir.MEMBERS_DIR) if t.scheme.members() else None}


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks at step boundaries; a second signal leaves now."""

    def __init__(self, enabled: bool):
        self.signal = None
        self._old = {}
        if enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._on_signal)
                except ValueError:  # not the main thread
                    pass

    def _on_signal(self, signum, frame):
        if self.signal is not None:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


@dataclass
class _LogWindow:
    """Per-step loss terms (loss_terms.LOG_KEYS) averaged over log_every steps."""

    keys: tuple = loss_terms.LOG_KEYS
    rows: list = field(default_factory=list)
    examples: int = 0
    t0: float = field(default_factory=time.perf_counter)

    def record(self, step: int, steps_per_epoch: int, lr: float, world: int) -> dict:
        now = time.perf_counter()
        mean = torch.stack(self.rows).mean(0)
        rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
               **{k: float(f"{v:.6g}") for k, v in zip(self.keys, mean.tolist())},
               "examples_per_s": round(self.examples * world / max(now - self.t0, 1e-9), 2)}
        self.rows, self.examples, self.t0 = [], 0, now
        return rec


@dataclass
class Training:
    r: Recipe
    out: Path
    dist: Dist
    device: str
    reporter: Reporter
    ds: training_data.Dataset
    pair: Pair
    batches: training_data.Batches
    fwd_model: nn.Module  # the student, DDP-wrapped under torchrun
    connectors: dict
    optimizer: torch.optim.Optimizer
    base_lrs: dict
    total: int
    progress: Progress
    tok_dir: Path | None
    method_terms: list  # (term, weight) of the run's distillation methods (methods.bind)
    scheme: Scheme = field(default_factory=Scheme)  # online KD or module replacement (online.py)

    def __post_init__(self):
        self.model = self.pair.student.model
        builtin = loss_terms.active(self.r, self.pair.teacher is not None)
        if self.scheme.replaces_ce:  # its own term holds every member's CE
            builtin = [(t, w) for t, w in builtin if t.name not in ("ce", "kd")]
        own = self.scheme.loss_term()
        self.terms = builtin + ([own] if own else []) + self.method_terms
        self.saved = {**self.connectors, **self.scheme.extras}  # trained beside the student, in trainer state
        self.batch_terms = [(t, w) for t, w in self.terms if not t.per_step]
        self.step_terms = [(t, w) for t, w in self.terms if t.per_step]
        self.batch_needs = loss_terms.needs(self.terms)
        self.ctx = loss_terms.Context(
            temperature=self.r.temperature, pair_map=list(enumerate(self.pair.layer_map or [])), connectors=self.connectors,
            student_cores={n: tensorize.layer_cores(m) for n, m in tensorize.mpo_modules(self.model).items()},
            teacher_cores=self.pair.teacher_cores, core_pairs=self.pair.core_pairs)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.warmup = int(self.r.warmup_ratio * self.total)
        self.log_keys = loss_terms.log_keys(self.terms)
        self.slot = {k: i for i, k in enumerate(self.log_keys)}  # term name -> index in a step's terms vector
        self.log = _LogWindow(keys=self.log_keys)
        s_paths, t_paths = loss_terms.feature_paths(self.terms, self.r)
        self.taps = {"student": FeatureTap(self.model, s_paths, "student") if s_paths else None,
                     "teacher": FeatureTap(self.pair.teacher.model, t_paths, "teacher") if t_paths else None}
        self.teacher_cache = teacher_cache.setup(self.r, self.pair, self.ds, self.batches, self.dist.world, t_paths,
                                                 self.batch_needs, self.reporter)
        self.scaler = precision.scaler(self.device, self.r.precision)
        self.metrics_log = run_dir.MetricsLog(self.out, self.r.tensorboard and self.dist.main, self.progress.step)
        if self.scaler is not None and self.progress.loss_scale:
            self.scaler.load_state_dict(self.progress.loss_scale)

    def train(self) -> None:
        stop = _StopFlag(enabled=self.dist.world == 1)
        self.reporter.start(self.total, self.progress.step)
        self.progress.start_clock()
        try:
            while self.progress.step < self.total:
                if stop.signal is not None:
                    path = self._save()
                    raise Interrupted(f"interrupted at step {self.progress.step} of {self.total}; checkpoint saved in {path}; "
                                      f"continue with: tdkd distill -o {self.out} --resume")
                self._after_step(self.step())
            if self.ds.dev is None and self.dist.main:
                run_dir.save_best(self.out, self.model, self.pair.student.source, self.tok_dir,
                                  {"metric": None, "value": None, "step": self.total})
            if self.dist.main:
                self._save_members()
        finally:
            for tap in self.taps.values():
                if tap is not None:
                    tap.close()
            self.metrics_log.close()
            stop.restore()
            self.reporter.finish()
        if self.dist.main:
            run_dir.mark_finished(self.out)
        self.dist.barrier()

    # -- one optimizer step ----------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """One optimizer step (every micro-batch, then AdamW); returns its loss terms."""
        terms = self._loss_step(self.progress.step)
        self._optimizer_step(terms)
        return terms

    def _forward(self, model, batch: dict, role: str) -> loss_terms.Outputs:
        tap = self.taps[role]
        if tap is not None:
            tap.clear()
        out = loss_terms.forward(model, self.pair.student.family, batch, self.batch_needs)
        if tap is not None:
            out.features = dict(tap.features)
        return out

    def _teacher(self, idx: list[int], batch: dict) -> loss_terms.Outputs:
        """The teacher's outputs for a batch: from the cache when it holds every example, else a
        forward pass (whose new rows the cache keeps)."""
        cache = self.teacher_cache
        if cache is not None:
            hit = cache.lookup(idx, self.device)
            if hit is not None:
                return hit
        with torch.no_grad():
            out = self._forward(self.pair.teacher.model, batch, "teacher")
        if cache is not None:
            out = cache.merge(idx, out)
            if not cache.on:
                self.reporter.info(f"teacher cache: off ({cache.off_reason})")
                self.teacher_cache = None
        return out

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _loss_step(self, step: int) -> torch.Tensor:
        """Forward and backward of every micro-batch of ``step`` (the cores contracted once), then
        the step terms. Returns the step's loss terms (loss_terms.LOG_KEYS)."""
        r, accum = self.r, self.r.grad_accum
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lrs[g["name"]] * optim.lr_factor(step, self.total, self.warmup)
        terms = torch.zeros(len(self.log_keys), dtype=torch.float64)
        slot = self.slot
        with precision.autocast(self.device, r.precision):  # the contraction of the cores
            rebuilt = [tensorize.RebuiltWeights(mod, grad=True) for mod in (self.model, *self.scheme.extras.values())]
        try:
            for m in range(accum):
                idx = self.batches.indices(step, m)
                batch = self.batches.batch(idx, self.model, self.device)
                with self.fwd_model.no_sync() if self.dist.world > 1 else nullcontext():
                    with precision.autocast(self.device, r.precision):
                        s = self.scheme.forward(self.fwd_model, batch, step, m, lambda mod: self._forward(mod, batch, "student"))
                        t = self._teacher(idx, batch) if "teacher" in self.batch_needs else None
                    loss = s.logits.new_zeros((), dtype=torch.float32)
                    for term, w in self.batch_terms:
                        value = term.compute(s, t, batch, self.ctx)
                        loss = loss + w * value
                        terms[slot[term.name]] += float(value.detach()) / accum
                    terms[0] += float(loss.detach()) / accum
                    if not math.isfinite(float(loss.detach())):
                        break
                    self._backward(loss / accum)
                self.log.examples += len(idx)
            if math.isfinite(float(terms[0])):
                for rb in rebuilt:
                    rb.backward()
        finally:
            for rb in rebuilt:
                rb.release()
        if math.isfinite(float(terms[0])):
            for term, w in self.step_terms:
                value = term.compute(None, None, None, self.ctx)
                self._backward(w * value)
                terms[slot[term.name]] = float(value.detach())
                terms[0] += w * float(value.detach())
        return terms

    def _optimizer_step(self, terms: torch.Tensor) -> None:
        distributed.all_reduce_grads(self.params, self.dist)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        terms[-1] = optim.clip(self.params, self.r.max_grad_norm)
        terms[:] = self.dist.all_mean(terms)
        # under fp16 loss scaling an overflowing gradient only skips the step (the scaler backs off)
        grads_ok = math.isfinite(float(terms[-1])) or self.scaler is not None
        if not (math.isfinite(float(terms[0])) and grads_ok):
            prev = run_dir.checkpoint_dirs(self.out)
            keep = f"the last good checkpoint is {prev[-1]}" if prev else "no checkpoint was written yet"
            kd, ce = (float(terms[self.slot[k]]) for k in ("kd", "ce"))
            raise TrainingDiverged(
                f"loss became {'NaN' if math.isnan(float(terms[0])) else 'infinite'} at step {self.progress.step + 1} "
                f"(kd {kd:.4g}, ce {ce:.4g}, grad norm {float(terms[-1]):.4g}); "
                f"{keep}; lower lr/mpo_lr and resume or restart")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1

    # -- after a step: log, evaluate, keep the best, save --------------------------------------
    def _after_step(self, terms: torch.Tensor) -> None:
        r, step, p = self.r, self.progress.step, self.progress
        self.log.rows.append(terms)
        if step % r.log_every == 0 or step == self.total:
            rec = self.log.record(step, self.batches.steps_per_epoch, self.optimizer.param_groups[0]["lr"], self.dist.world)
            if self.dist.main:
                self.metrics_log.append(rec)
            self.reporter.step(step, self.total, rec)
        do_eval = self.ds.dev is not None and ((r.eval_every and step % r.eval_every == 0) or step == self.total)
        if do_eval and self.dist.main:
            metrics, member = self._evaluate()
            improved = p.record_eval(metrics, self.ds.metric)
            if improved:
                self._save_best(member)
            self.metrics_log.append({"step": step, "eval": metrics, "best": improved})
            self.reporter.evaluated(step, metrics, improved)
        if do_eval:
            p.best = distributed.broadcast_best(p.best, self.dist)
        if (r.save_every and step % r.save_every == 0) or step == self.total:
            self._save()
        elif self.teacher_cache is not None and self.teacher_cache.complete and self.dist.main:
            self.teacher_cache.save()  # the last example was just filled (a no-op once written)

    def _evaluate(self) -> tuple[dict, str | None]:
        """Dev metrics, and the member they belong to: of an online scheme every member is
        evaluated and the best one's metrics come first (``members`` holds them all)."""
        names = self.scheme.members()
        if not names:
            return self._evaluate_model(self.model), None
        results = {}
        for name in names:
            with self.scheme.member(self.model, name) as (model, _):
                results[name] = self._evaluate_model(model)
        best = max(names, key=lambda n: results[n][self.ds.metric])  # the first of equals
        return {**results[best], "member": best, "members": results}, best

    def _evaluate_model(self, model: nn.Module) -> dict:
        if self.ds.kind == "text":
            return evaluate_text(model, self.batches.enc_dev, self.ds.task, self.r.eval_batch_size, self.device)[0]
        return evaluate_images(model, self.ds.dev, self.r.eval_batch_size, self.device)[0]

    def _save_best(self, member: str | None) -> None:
        with self.scheme.member(self.model, member) as (model, source):
            run_dir.save_best(self.out, model, source or self.pair.student.source, self.tok_dir, self.progress.best)

    def _save_members(self) -> None:
        """members/NAME/: every deployable member of an online scheme as it ends the run."""
        for name in self.scheme.members():
            with self.scheme.member(self.model, name) as (model, source):
                run_dir.save_member(self.out, name, model, source or self.pair.student.source, self.tok_dir, self.total)

    def _save(self) -> Path | None:
        rng = distributed.gather_rng(self.dist)
        path = None
        if self.scaler is not None:
            self.progress.loss_scale = self.scaler.state_dict()
        if self.dist.main:
            if self.teacher_cache is not None:
                self.teacher_cache.save()
            n = self.r.n if tensorize.mpo_modules(self.model) else None
            path = run_dir.save_full(self.out, self.progress.step, self.model, self.pair.student.source, self.tok_dir, n,
                                     self.optimizer, self.saved, rng, self.progress.state_dict())
            for old in run_dir.checkpoint_dirs(self.out)[:-self.r.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path
