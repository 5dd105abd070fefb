"""Every bad input: one clear line on stderr, a non-zero exit code, no traceback, no output left."""

import json
import os
import subprocess
import sys

import pytest


from .helpers import bert_classifier, run_cli


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("errs")
    bert_classifier(d, hidden=48, layers=1, heads=4, ffn=96, name="bert")
    (d / "notst.safetensors").write_text("hello, I am not a tensor file\n")
    from safetensors.torch import save_file
    import torch

    save_file({"a": torch.zeros(1000)}, str(d / "full.safetensors"))
    data = (d / "full.safetensors").read_bytes()
    (d / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    return d


CASES = {
    "missing path": (["decompose", "./does-not-exist", "-o", "OUT"], 2, "not found"),
    "not safetensors": (["decompose", "vit_tiny_patch16_224", "--weights", "notst.safetensors", "-o", "OUT"], 1, "not a safetensors file"),
    "truncated safetensors": (["decompose", "vit_tiny_patch16_224", "--weights", "trunc.safetensors", "-o", "OUT"], 1, "truncated"),
    "wrong factor product": (["decompose", "bert", "--shapes", "48=4,2,5", "--n", "3", "-o", "OUT"], 2, "multiplies to 40"),
    "factor count vs n": (["decompose", "bert", "--shapes", "48=4,2,6", "--n", "4", "-o", "OUT"], 2, "n is 4"),
    "n below 2": (["decompose", "bert", "--n", "1", "-o", "OUT"], 2, "at least 2"),
    "pattern matches nothing": (["decompose", "bert", "--targets", "*.nothing_here", "-o", "OUT"], 2, "matches no Linear"),
    "unknown preset offline": (["decompose", "no-such-preset-xyz", "-o", "OUT"], 2, "unreachable"),
    "bad rank": (["decompose", "bert", "--rank", "0", "-o", "OUT"], 2, "at least 1"),
    "not an integer": (["decompose", "bert", "--n", "five", "-o", "OUT"], 2, "--n"),
    "merge a dense model": (["merge", "bert", "-o", "OUT"], 2, "not an MPO checkpoint"),
    "merge a file": (["merge", "notst.safetensors", "-o", "OUT"], 2, "is a file"),
    "timm without weights": (["decompose", "vit_tiny_patch16_224", "-o", "OUT"], 2, "--weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, workdir, capsys, monkeypatch):
    args, code, needle = CASES[case]
    monkeypatch.chdir(workdir)
    rc, out, err = run_cli(args, capsys)
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err + out
    assert not (workdir / "OUT").exists()
    assert not [p for p in os.listdir(workdir) if p.startswith(".OUT")]


def test_existing_output_is_refused_then_replaced_with_force(workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    (workdir / "taken").mkdir()
    (workdir / "taken" / "keep.txt").write_text("precious")
    rc, _, err = run_cli(["decompose", "bert", "-o", "taken"], capsys)
    assert rc == 2 and "already exists" in err
    assert (workdir / "taken" / "keep.txt").read_text() == "precious"
    # A failing run with --force leaves the earlier output untouched.
    rc, _, err = run_cli(["decompose", "bert", "--n", "1", "-o", "taken", "--force"], capsys)
    assert rc == 2 and (workdir / "taken" / "keep.txt").exists()
    rc, _, err = run_cli(["decompose", "bert", "-o", "taken", "--force", "--n", "3"], capsys)
    assert rc == 0, err
    assert not (workdir / "taken" / "keep.txt").exists()
    assert json.loads((workdir / "taken" / "tdkd.json").read_text())["n"] == 3


def test_real_process_has_no_traceback_and_debug_shows_one(workdir):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "tdkd_cli", "decompose", "bert", "--n", "1", "-o", "OUT"]
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: --n must be at least 2 (got 1)"
    p = subprocess.run(cmd + ["--debug"], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_help_is_fast_and_lazy():
    """--help must not import torch, transformers or timm."""
    code = ("import sys\nfrom tdkd_cli.cli.app import main\n"
            "try:\n    main(['decompose', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'timm') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Example" in p.stdout and "--shapes" in p.stdout


def test_distill_without_output_is_a_usage_error(capsys):
    rc, _, err = run_cli(["distill"], capsys)
    assert rc == 2 and err.startswith("error: ") and "--output" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["decompose", "distill", "merge", "eval", "bench", "recipes"])
def test_help_shows_every_option_text_whole(command, capsys, monkeypatch):
    """Help is rendered with rich, which reads [...] as markup: no option's text may lose a part."""
    import re

    import typer.main

    from tdkd_cli.cli.app import app

    monkeypatch.setenv("COLUMNS", "100")
    rc, out, _ = run_cli([command, "--help"], capsys)
    assert rc == 0
    flat = lambda text: re.sub(r"\s+", "", text.replace("│", ""))  # noqa: E731  (rich wraps lines in boxes)
    cmd = typer.main.get_command(app).commands[command]
    texts = [p.help for p in cmd.params if getattr(p, "help", None)]
    assert texts
    for text in texts:
        assert flat(text) in flat(out), text
