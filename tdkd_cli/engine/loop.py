"""The training loop of `tdkd distill` (train.py sets a run up and hands it here): ``Training``
repeats one optimizer step (``_loss_step``: every micro-batch's forward and backward, the cores
contracted once; ``_optimizer_step``: all-reduce, unscale, clip, divergence check, AdamW or Adam) and what
follows it (``_after_step``: log, evaluate, keep the best, save) until the last step. A signal
saves a checkpoint at the next step boundary and ends the run (exit 130).
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

from . import distributed, graph_batch, optim, precision, run_dir, teacher_cache, training_data
from ..methods import loss_terms
from ..tensor import tensorize
from .distributed import Dist
from ..core.errors import Interrupted, TrainingDiverged
from .evaluate import evaluate_graph, evaluate_images, evaluate_text
from ..methods.features import FeatureTap
from ..core.reporting import Reporter
from ..io.pair import Pair
from ..core.recipe import Recipe
from .run_dir import Progress
from ..methods.schemes.base import Scheme

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
    method_terms: list  # (term, weight) of the run's distillation methods (binding.bind)
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
        self._graph_teacher = None  # the teacher's outputs on a graph, kept from the first step
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
            if self.r.keep_best_only:
                run_dir.drop_checkpoints(self.out)
        self.dist.barrier()

    # -- one optimizer step ----------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        """One optimizer step (every micro-batch, then the optimizer); returns its loss terms."""
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
        if self.ds.kind == "graph" and self._graph_teacher is not None:
            return self._graph_teacher  # full-graph training: every step's batch is the same graph
        with torch.no_grad():
            out = self._forward(self.pair.teacher.model, batch, "teacher")
        if self.ds.kind == "graph":
            self._graph_teacher = out
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
            g["lr"] = self.base_lrs[g["name"]] * optim.lr_factor(step, self.total, self.warmup, self.r.lr_schedule)
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
        if self.ds.kind == "graph":  # validation nodes, on the graph training sees
            edges = graph_batch.training_edges(self.ds.dev, self.r.graph_setting)
            return evaluate_graph(model, self.ds.dev, "val", self.device, edges)[0]
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
