"""`tdkd synthesize`: labelled training images from a teacher alone (data-free distillation).

Pixel-space DeepInversion optimises every batch of images for 1-2k teacher passes, which on a
2-core CPU is hours for 2,000 images. Here the inversion is amortised, as the fast data-free
methods do: a small conditional generator (methods/inversion.py's ``ImageGenerator``) is trained
for ``steps`` steps against methods/inversion.py's loss on its batches (the teacher's BatchNorm
statistics, its cross-entropy for each image's target class, total-variation and L2 priors and,
with a student, the adaptive Jensen-Shannon term), then sampled batch by batch (one forward pass
per batch). Image i of the run has class i mod K, so every batch holds every class alike; every
batch's noise comes from its own generator seeded by the run's seed and the batch's (or step's) index.

Output: an image folder ``OUT/train/CLASS/NNNNNN.png`` (8-bit RGB at the teacher's input size) with
``OUT/synthesis.json`` (settings, the generator's loss log, per-batch teacher agreement). It has no
dev split on purpose: a student trained on it is evaluated on real images (``tdkd distill --data
OUT --dev-data REAL``).

Resume: until it is complete the work lives in ``OUT.partial/`` beside ``OUT``: ``state.json`` (the
settings), the generator's training state every ``save_every`` steps (weights, BatchNorm buffers and
Adam moments as safetensors) and one directory per sampled batch, each written under a temporary
name and renamed (io/checkpoint.atomic_dir). The same command continues a killed run from its last
saved step; sampled batches are never redone. Each step and batch depends only on the saved state, the seed and its index, so
the result is bitwise that of an uninterrupted run (same torch build and thread count). When every
batch is done ``OUT`` is written atomically and the partial directory removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..core.errors import UsageError
from ..engine import run_dir
from ..io import caches
from ..io import checkpoint as ckpt
from ..io import data as data_mod
from ..io import models
from ..io.model_files import load_any
from ..methods.inversion import BNStatsTap, ImageGenerator, InversionWeights, bn_layers, inversion_loss

FORMAT = "tdkd-synthesis"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SynthesisConfig:
    """How many images and how the generator is trained (`tdkd synthesize --help` documents each)."""

    count: int = 2000
    batch_size: int = 100
    steps: int = 200
    lr: float = 3e-3
    weights: InversionWeights = field(default_factory=InversionWeights)
    save_every: int = 50
    seed: int = 0

    def check(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UsageError(msg)

        need(self.count >= 1, f"--count must be at least 1 (got {self.count})")
        need(self.batch_size >= 2, f"--batch-size must be at least 2: BatchNorm statistics are batch statistics (got {self.batch_size})")
        need(self.steps >= 1, f"--steps must be at least 1 (got {self.steps})")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number (got {self.lr})")
        need(self.save_every >= 1, f"--save-every must be at least 1 (got {self.save_every})")
        need(self.seed >= 0, f"--seed must be >= 0 (got {self.seed})")
        for k, v in asdict(self.weights).items():
            need(math.isfinite(v) and v >= 0, f"--{k.replace('_', '-')}-weight must be a number >= 0 (got {v})")


@dataclass
class Inverter:
    """A frozen teacher (and optional student) ready to be inverted, with its input geometry."""

    teacher: object
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    student: object = None
    fingerprint: dict = field(default_factory=dict)


def _frozen_image_model(spec: str, role: str):
    loaded = load_any(spec, keep_head=True)
    if loaded.family != "timm":
        raise UsageError(f"{role} {spec} is a text model: tdkd synthesize inverts image classifiers (timm models)")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_inverter(teacher: str, student: str | None = None) -> Inverter:
    """Load and check the teacher (image classifier with BatchNorm layers) and the student."""
    import torch

    model = _frozen_image_model(teacher, "teacher")
    if not bn_layers(model):
        raise UsageError(f"teacher {teacher} has no BatchNorm layers with running statistics: it cannot be inverted "
                         f"by matching BatchNorm statistics (DeepInversion); use real or other unlabelled images")
    size, mean, std = models.image_norm(model)
    with torch.no_grad():
        k = int(model(torch.zeros(2, len(mean), *size)).shape[-1])
    inv = Inverter(model, tuple(size), tuple(mean), tuple(std), k,
                   fingerprint={"teacher": caches.digest(model.state_dict())})
    if student is not None:
        s = _frozen_image_model(student, "student")
        s_size, s_mean, s_std = models.image_norm(s)
        with torch.no_grad():
            s_k = int(s(torch.zeros(2, len(mean), *size)).shape[-1])
        if tuple(s_size) != inv.size or tuple(s_mean) != inv.mean or tuple(s_std) != inv.std or s_k != k:
            raise UsageError(f"student {student} reads other inputs or has other outputs than the teacher "
                             f"({list(s_size)} / {s_k} classes vs {list(size)} / {k}): the adaptive term needs the same")
        inv.student, inv.fingerprint["student"] = s, caches.digest(s.state_dict())
    return inv


def class_names(given: Sequence[str] | None, k: int) -> list[str]:
    """Folder names of the teacher's K classes, index order. tdkd numbers an image folder's classes
    by sorted folder name, so the names must sort in index order. Given: names, or one image folder
    (or builtin:digits) whose class folders (train split) are read, never its images."""
    if not given:
        width = len(str(k - 1))
        return [str(i).zfill(width) for i in range(k)]
    if len(given) == 1 and not given[0].count(","):
        path, _ = data_mod.resolve_data(given[0])
        if path.exists():
            root = path / "train" if (path / "train").is_dir() else path
            given = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = [n.strip() for g in given for n in g.split(",") if n.strip()]
    if len(names) != k:
        raise UsageError(f"--classes names {len(names)} classes, the teacher has {k} outputs")
    if names != sorted(names) or len(set(names)) != k:
        raise UsageError("--classes must be distinct names in sorted order (tdkd numbers an image folder's classes "
                         "by sorted folder name, so class i must be the i-th name)")
    if any("/" in n or n in (".", "..") or n.startswith(".") for n in names):
        raise UsageError("--classes names must be plain folder names")
    return names


def batch_plan(count: int, batch_size: int) -> list[tuple[int, int]]:
    """(first image index, images) of each batch."""
    return [(s, min(batch_size, count - s)) for s in range(0, count, batch_size)]


def rng(seed: int, *index: int):
    """A torch generator seeded by the run's seed and an index path (phase, step or batch)."""
    import numpy as np
    import torch

    state = np.random.SeedSequence([seed, *index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2**63 - 1)))


def _pixel_bounds(inv: Inverter):
    import torch

    mean = torch.tensor(inv.mean).view(1, -1, 1, 1)
    std = torch.tensor(inv.std).view(1, -1, 1, 1)
    return mean, std, (0 - mean) / std, (1 - mean) / std


def new_generator(inv: Inverter, cfg: SynthesisConfig) -> ImageGenerator:
    """The generator at initialisation, drawn from the run's seed (the global RNG is left as it was)."""
    import torch

    _, _, lo, hi = _pixel_bounds(inv)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return ImageGenerator(inv.num_classes, inv.size, lo.flatten().tolist(), hi.flatten().tolist())


def generator_inputs(inv: Inverter, g, n: int, first: int = 0):
    """(noise, classes) of n images: image i of the run has class i mod K."""
    import torch

    y = (torch.arange(first, first + n) % inv.num_classes).long()
    return torch.randn(n, ImageGenerator.LATENT, generator=g), y


def train_step(inv: Inverter, gen: ImageGenerator, opt, tap: BNStatsTap, cfg: SynthesisConfig, step: int) -> dict[str, float]:
    """One generator update on a batch drawn for ``step``: the inversion loss of its images."""
    z, y = generator_inputs(inv, rng(cfg.seed, 0, step), cfg.batch_size, first=step * cfg.batch_size)
    loss, terms = inversion_loss(inv.teacher, tap, gen(z, y), y, cfg.weights, inv.student)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"step": step + 1, "loss": float(loss.detach()), **terms}


def save_generator(work: Path, gen: ImageGenerator, opt, step: int, log: list[dict]) -> None:
    """The generator's training state at ``step`` (weights and BatchNorm buffers, Adam's moments) as
    safetensors in work/generator-STEP/, written under a temporary name and renamed; older ones go."""
    tensors = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    tensors.update(run_dir.optimizer_tensors(opt))
    final = work / f"generator-{step:06d}"
    with ckpt.atomic_dir(final, force=True, what="generator checkpoint") as tmp:
        ckpt.save_tensors(tensors, tmp / "state.safetensors")
        (tmp / "log.json").write_text(json.dumps({"step": step, "log": log}) + "\n")
    for old in work.glob("generator-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_generator(work: Path, inv: Inverter, cfg: SynthesisConfig):
    """(generator, its Adam optimizer, steps done, loss log): from the latest checkpoint in ``work``
    (a damaged one is an error naming it), else new."""
    import torch

    gen = new_generator(inv, cfg)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
    saved = sorted(p for p in work.glob("generator-*") if p.is_dir())
    if not saved:
        return gen, opt, 0, []
    latest = saved[-1]
    tensors = ckpt.load_tensors(latest / "state.safetensors")
    info = json.loads((latest / "log.json").read_text())
    ckpt_state = {k[len("generator."):]: v for k, v in tensors.items() if k.startswith("generator.")}
    models.load_state_strict(gen, ckpt_state, f"{latest} does not fit the generator")
    run_dir.load_optimizer_tensors(opt, tensors, latest)
    return gen, opt, int(info["step"]), list(info["log"])


def train_generator(inv: Inverter, cfg: SynthesisConfig, work: Path,
                    on_step: Callable[[int, dict], None] | None = None) -> tuple[ImageGenerator, list[dict]]:
    """Train (or continue training) the generator for ``cfg.steps`` steps, saving every ``save_every``."""
    gen, opt, done, log = load_generator(work, inv, cfg)
    gen.train()
    with BNStatsTap(inv.teacher) as tap:
        for step in range(done, cfg.steps):
            terms = train_step(inv, gen, opt, tap, cfg, step)
            if step == 0 or (step + 1) % 10 == 0 or step + 1 == cfg.steps:
                log.append(terms)
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save_generator(work, gen, opt, step + 1, log)
            if on_step:
                on_step(step + 1, terms)
    return gen, log


def sample_batch(inv: Inverter, gen: ImageGenerator, cfg: SynthesisConfig, index: int, start: int, n: int):
    """Images start..start+n-1 of the run from the trained generator (batch ``index``'s own noise; the
    generator's BatchNorm layers use the batch's statistics, as in training): (uint8 pixels, classes)."""
    import torch

    z, y = generator_inputs(inv, rng(cfg.seed, 1, index), n, first=start)
    with torch.no_grad():
        return to_pixels(gen.train()(z, y), inv), y


def to_pixels(x, inv: Inverter):
    """Normalised images (B, C, H, W) -> uint8 RGB arrays (B, H, W, 3), rounded to the nearest level."""
    import torch

    mean, std, _, _ = _pixel_bounds(inv)
    px = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    px = px.permute(0, 2, 3, 1).numpy()
    return px.repeat(3, axis=3) if px.shape[3] == 1 else px


def from_pixels(px, inv: Inverter):
    """uint8 RGB arrays (B, H, W, 3) -> the teacher's normalised input, as image folders are read."""
    import torch

    mean, std, _, _ = _pixel_bounds(inv)
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 255.0
    return (x[:, :len(inv.mean)] - mean) / std


# ----------------------------------------------------------------------------------------------
# The work directory (OUT.partial/): settings, then one directory per finished batch
# ----------------------------------------------------------------------------------------------
def partial_dir(output: Path) -> Path:
    return output.parent / f"{output.name}.partial"


def _settings(cfg: SynthesisConfig, inv: Inverter, classes: list[str], teacher: str, student: str | None) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "teacher": teacher, "student": student,
            "fingerprint": inv.fingerprint, "classes": classes, "image_size": list(inv.size),
            "mean": list(inv.mean), "std": list(inv.std), "count": cfg.count, "batch_size": cfg.batch_size,
            "steps": cfg.steps, "lr": cfg.lr, "weights": asdict(cfg.weights), "save_every": cfg.save_every,
            "seed": cfg.seed, "generator": {"latent": ImageGenerator.LATENT, "width": ImageGenerator.WIDTH}}


def _same_run(stored: dict, settings: dict) -> str | None:
    """None when a stored state continues these settings; else the first setting that differs."""
    for key in settings:
        if key not in ("teacher", "student") and stored.get(key) != settings[key]:
            return key
    return None


def open_work(output: Path, settings: dict, force: bool) -> tuple[Path, set[int]]:
    """The work directory of this run and the batches it has finished (a new one when none)."""
    work = partial_dir(output)
    state = work / "state.json"
    if work.exists():
        try:
            stored = json.loads(state.read_text())
        except (OSError, ValueError):
            stored = None
        if not isinstance(stored, dict) or stored.get("format") != FORMAT:
            raise UsageError(f"{work} exists and is not an unfinished tdkd synthesis; move it away")
        differs = _same_run(stored, settings)
        if differs is None:
            done = {int(p.name) for p in (work / "batches").iterdir() if p.is_dir() and p.name.isdigit()}
            return work, done
        if not force:
            raise UsageError(f"{work} holds an unfinished synthesis with another {differs} ({stored.get(differs)!r}, "
                             f"now {settings[differs]!r}): rerun with its options to continue it, or pass --force to start over")
        shutil.rmtree(work)
    with ckpt.writing("synthesis work directory", work):
        (work / "batches").mkdir(parents=True)
        ckpt.atomic_write_text(state, json.dumps(settings, indent=2) + "\n", what="synthesis state")
    return work, set()


def write_batch(work: Path, index: int, start: int, px, classes: list[str], info: dict) -> None:
    """One finished batch: PNGs + batch.json in a temporary directory, fsynced, renamed into place."""
    from PIL import Image

    final = work / "batches" / f"{index:05d}"
    with ckpt.atomic_dir(final, force=True, what="synthesized batch") as tmp:
        for j, img in enumerate(px):
            i = start + j
            cls = tmp / classes[i % len(classes)]
            cls.mkdir(exist_ok=True)
            Image.fromarray(img).save(cls / f"{i:06d}.png")
        (tmp / "batch.json").write_text(json.dumps(info) + "\n")


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (the work folder is removed afterwards, so the
    images are not stored twice), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def finish(work: Path, output: Path, settings: dict, force: bool) -> list[dict]:
    """Gather every batch into OUT/train/CLASS/, write synthesis.json; atomically; remove the work."""
    batches = sorted((p for p in (work / "batches").iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: p.name)
    infos = [json.loads((b / "batch.json").read_text()) for b in batches]
    with ckpt.atomic_dir(output, force=force, what="synthesized images") as tmp:
        for name in settings["classes"]:
            (tmp / "train" / name).mkdir(parents=True)
        for b in batches:
            for f in sorted(b.glob("*/*.png")):
                _link_or_copy(f, tmp / "train" / f.parent.name / f.name)
        summary = {**settings, "batches": infos, "dev": "none: evaluate on real images (tdkd distill --dev-data REAL)"}
        (tmp / "synthesis.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return infos


# ----------------------------------------------------------------------------------------------
def synthesize(teacher: str, output: Path, cfg: SynthesisConfig, *, student: str | None = None,
               classes: Sequence[str] | None = None, force: bool = False,
               on_start: Callable[[int, int], None] | None = None,
               on_step: Callable[[int, dict], None] | None = None,
               on_batch: Callable[[int, dict], None] | None = None) -> dict:
    """Synthesize ``cfg.count`` labelled images from ``teacher`` into the image folder ``output``
    (module docstring); continues an unfinished run of the same settings. Progress: ``on_start(units,
    units done)`` (a unit is a generator step or a sampled batch), ``on_step``, ``on_batch``."""
    output = Path(output)
    cfg.check()
    if cfg.weights.adaptive > 0 and student is None:
        raise UsageError("--adaptive-weight needs --student (the student whose disagreement with the teacher it seeks)")
    ckpt.check_output(output, force)
    inv = load_inverter(teacher, student if cfg.weights.adaptive > 0 else None)
    names = class_names(classes, inv.num_classes)
    settings = _settings(cfg, inv, names, teacher, student if inv.student is not None else None)
    work, done = open_work(output, settings, force)
    plan = batch_plan(cfg.count, cfg.batch_size)
    steps_done = max((int(p.name.split("-")[1]) for p in work.glob("generator-*") if p.is_dir()), default=0)
    if on_start:
        on_start(cfg.steps + len(plan), steps_done + len(done))
    t0 = time.perf_counter()
    gen, log = train_generator(inv, cfg, work, on_step)
    t1 = time.perf_counter()
    made = 0
    for index, (start, n) in enumerate(plan):
        if index in done:
            continue
        px, y = sample_batch(inv, gen, cfg, index, start, n)
        info = {"batch": index, "images": n, "teacher_agrees": _agreement(inv, px, y)}
        write_batch(work, index, start, px, names, info)
        made += n
        if on_batch:
            on_batch(index, info)
    t2 = time.perf_counter()
    infos = finish(work, output, {**settings, "generator_log": log}, force)
    return {"output": str(output), "count": cfg.count, "classes": names, "image_size": list(inv.size),
            "steps": cfg.steps, "steps_resumed": steps_done, "batches": len(plan), "batches_resumed": len(done),
            "images_made": made, "train_seconds": round(t1 - t0, 2), "sample_seconds": round(t2 - t1, 2),
            "images_per_s": round(made / (t2 - t0), 3) if made and t2 > t0 else None,
            "teacher_agrees": sum(i["teacher_agrees"] * i["images"] for i in infos) / cfg.count,
            "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"], "last_terms": log[-1], "settings": settings}


def _agreement(inv: Inverter, px, y) -> float:
    """Fraction of saved (8-bit) images the teacher gives their target class."""
    import torch

    with torch.no_grad():
        return float((inv.teacher(from_pixels(px, inv)).argmax(-1) == y).float().mean())
