"""Everything tdkd shows on a terminal: rich tables of each command's report, progress bars, the
distill reporter (progress bar on a terminal, plain log lines in CI logs and pipes) and JSON."""

from __future__ import annotations

import json
import sys

from ..io.checkpoint import human_bytes


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # In pipes and CI logs rich would assume 80 columns and truncate table cells.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, width=width)


def fmt_int(x: int) -> str:
    return f"{x:,}"


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def progress(label: str, enabled: bool):
    """A transient progress bar on stderr (disabled: a no-op with the same interface)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.description}"), console=console(stderr=True), transient=True,
                    disable=not enabled)


def _table(title: str, columns, right=(), **kwargs):
    from rich.table import Table

    t = Table(title=title, **kwargs)
    for col in columns:
        t.add_column(col, justify="right" if col in right else "left")
    return t


# ----------------------------------------------------------------------------------------------
def decompose_report(report: dict, model: str, output, n: int, rank) -> None:
    nums = ("params", "MPO params", "x", "rel. error")
    t = _table(f"decompose {model} -> {output}  (n={n}{'' if rank is None else f', chi={rank}'})",
               ("layer", "weight", "factor shapes (out x in)", "bonds") + nums, right=nums)
    for L in report["layers"]:
        t.add_row(L["name"], "x".join(map(str, L["weight_shape"])), f"{L['out_shape']} x {L['in_shape']}",
                  ",".join(map(str, L["bonds"][1:-1])), fmt_int(L["dense_params"]), fmt_int(L["mpo_params"]),
                  f"{L['mpo_params'] / L['dense_params']:.2f}", f"{L['rel_error']:.1e}")
    tot = report["totals"]
    con = console()
    con.print(t)
    con.print(f"{tot['layers']} matrices: {fmt_int(tot['dense_params_targets'])} -> {fmt_int(tot['mpo_params_targets'])} parameters")
    con.print(f"model: {fmt_int(tot['model_params_before'])} -> {fmt_int(tot['model_params_after'])} parameters "
              f"(over-parameterization x{tot['overparam_ratio']:.3f}); max rel. error {tot['max_rel_error']:.1e}; "
              f"probe output max |diff| {tot['output_max_abs_diff']:.1e}")


def merge_report(report: dict) -> None:
    con = console()
    con.print(f"merged {report['layers']} MPO layers: {fmt_int(report['params_mpo'])} -> {fmt_int(report['params_merged'])} parameters")
    con.print(f"verification on a probe batch: max |diff| {report['max_abs_diff']:.2e}, relative {report['max_rel_diff']:.2e} "
              f"(tolerance {report['tolerance']:g}) OK -> {report['output']}")


def synthesize_report(report: dict, teacher: str) -> None:
    con = console()
    resumed = []
    if report["steps_resumed"]:
        resumed.append(f"{report['steps_resumed']} of {report['steps']} generator steps")
    if report["batches_resumed"]:
        resumed.append(f"{report['batches_resumed']} of {report['batches']} batches")
    note = f"; continued from an earlier run ({', '.join(resumed)})" if resumed else ""
    con.print(f"synthesized {fmt_int(report['count'])} images of {len(report['classes'])} classes at "
              f"{report['image_size'][0]}x{report['image_size'][1]} from {teacher} -> {report['output']}/train")
    con.print(f"generator: {report['steps']} steps in {report['train_seconds']:.1f} s, loss {report['loss_first']:.3g} -> "
              f"{report['loss_last']:.3g}; sampling {report['sample_seconds']:.1f} s"
              + (f"; {report['images_per_s']:.2f} images/s overall" if report["images_per_s"] else "") + note)
    con.print(f"the teacher gives {100 * report['teacher_agrees']:.1f}% of the saved images their target class")
    con.print(f"next: tdkd distill --teacher {teacher} --data {report['output']} --dev-data REAL_IMAGES -o RUN "
              f"(evaluated on the real dev split)")


def distill_summary(report: dict, output) -> None:
    from rich.table import Table

    t = Table(title=f"distill -> {output}")
    t.add_column("")
    t.add_column("", justify="right")
    best = report["best"]
    rows = [("steps", fmt_int(report["steps"])), ("processes x device", f"{report['world_size']} x {report['device']}"),
            ("training examples", fmt_int(report["train_examples"])),
            ("parameters while training", fmt_int(report["params_training"])),
            ("parameters after merge", fmt_int(report["params_inference"]))]
    if report["aligned_cores"]:
        rows.append(("aligned auxiliary cores", f"{report['aligned_cores']} (skipped {report['skipped_cores']})"))
    for note in report.get("connectors") or ():
        rows.append(("connector (trained, not in the merged model)", note))
    scheme = report.get("scheme") or {}
    if scheme:
        rows.append(("trained with", f"{scheme['method']}" + (f": {', '.join(scheme['members'])}" if scheme.get("members") else "")))
    for k, v in (report.get("final_metrics") or {}).items():
        if isinstance(v, (int, float)):
            rows.append((f"final dev {k}", f"{v:.4f}"))
    if best.get("value") is not None:
        of = f", {best['member']}" if best.get("member") else ""
        rows.append((f"best dev {best['metric']}", f"{best['value']:.4f} (step {best['step']}{of})"))
    rows += [("best model", report["best_dir"]),
             ("last full checkpoint", str(report["checkpoint"]) if report["checkpoint"] else "none kept (keep_best_only)")]
    disk = report.get("disk")
    if disk:
        rows.append(("disk (estimated)", f"{human_bytes(disk['checkpoint_bytes'])} a checkpoint, {human_bytes(disk['peak_bytes'])} at most"))
    if report.get("members_dir"):
        rows.append(("every member (last step)", report["members_dir"]))
    for a, b in rows:
        t.add_row(a, b)
    console().print(t)
    console().print(f"next: tdkd merge {report['best_dir']} -o student && tdkd eval student --data ...")


class DistillReporter:
    """Rich progress bar on a terminal; plain log lines on stderr otherwise (CI logs, pipes)."""

    NOT_TERMS = ("step", "epoch", "lr", "loss", "grad_norm", "examples_per_s")

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.err = console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.progress = None
        self.bar = None
        self.evals: list[tuple[int, dict, bool]] = []

    def info(self, text: str) -> None:
        if not self.quiet:
            self.err.print(text, soft_wrap=True, markup=False)  # one line in logs, however long

    def start(self, total: int, start_step: int) -> None:
        if self.quiet or not self.tty:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"), console=self.err)
        self.progress.start()
        self.bar = self.progress.add_task("", total=total, completed=start_step)

    def step(self, step: int, total: int, rec: dict) -> None:
        parts = [f"loss {rec['loss']:.4g}"] + [f"{k} {v:.4g}" for k, v in rec.items() if k not in self.NOT_TERMS and v]
        text = " ".join(parts) + f" | {rec['examples_per_s']:.1f} ex/s"
        if self.progress is not None:
            self.progress.update(self.bar, completed=step, description=text)
        elif not self.quiet:
            self.err.print(f"step {step}/{total} lr {rec['lr']:.3g} {text}")

    def evaluated(self, step: int, metrics: dict, best: bool) -> None:
        self.evals.append((step, metrics, best))
        if not self.quiet:
            m = " ".join(_metric_text(k, v) for k, v in metrics.items())
            self.err.print(f"eval at step {step}: {m}{'  (best so far)' if best else ''}")

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _metric_text(key: str, value) -> str:
    """One evaluation's entry: a number, the best member's name, or every member's first metric."""
    if isinstance(value, (int, float)):
        return f"{key} {value:.4f}"
    if isinstance(value, dict):
        return "(" + ", ".join(f"{n} {next(iter(v.values())):.4f}" for n, v in value.items()) + ")"
    return f"{key} {value}"


def recipes_table(rows: list[tuple[str, str]], where) -> None:
    t = _table(f"built-in recipes ({where})", ("name", "description"))
    for name, desc in rows:
        t.add_row(name, desc)
    console().print(t)


def eval_report(report: dict, model: str) -> None:
    title = f"eval {model} on {report['task']} ({report['split']}, {report['examples']} examples)"
    t = _table(title, ("metric", "value"), right=("value",), min_width=min(len(title), 120))
    for k, v in report["metrics"].items():
        t.add_row(k, f"{v:.4f}")
    console().print(t)
    if report.get("predictions"):
        console().print(f"predictions -> {report['predictions']}")


def bench_report(report: dict) -> None:
    st = report["settings"]
    cols = ("model", "params", "median ms", "p90 ms", "p99 ms", "items/s", "weights MB", "peak MB", "x latency", "speedup")
    inputs = ", ".join(dict.fromkeys(r.get("input", f"{st['seq_len']} tokens") for r in report["models"]))
    t = _table(f"bench on {st['device']} ({report['env']['threads']} threads), batch {st['batch_size']}, "
               f"input {inputs}, {st['dtype']}, {st['iters']} iters", cols, right=cols[1:])
    for r in report["models"]:
        t.add_row(r["name"], fmt_int(r["params"]), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['p99_ms']:.2f}",
                  f"{r['throughput_per_s']:.1f}", f"{r['weights_mb']:.1f}",
                  "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
                  f"{r['latency_ratio']:.3f}", f"{r['speedup']:.2f}")
    console().print(t)
    for r in (report.get("regression") or {}).get("models", []):
        if r["status"] == "no baseline":
            console().print(f"{r['name']}: no baseline entry")
        else:
            console().print(f"{r['name']}: {r['gate']} {r['baseline']:.4g} -> {r['current']:.4g} ({r['change']:+.1%}) {r['status']}")


def methods_table(rows: list[dict]) -> None:
    t = _table("distillation losses (combine any of them; each works with dense and MPO students)",
               ("name", "kind", "paper", "how to switch it on", "options [default]", "models"))
    for r in rows:
        opts = ", ".join(f"{k} [{v['default']}]" if v["default"] is not None else k for k, v in r["options"].items())
        t.add_row(r["name"], r["kind"], r["paper"], r["recipe"], opts or "-", r["families"])
    console().print(t)
