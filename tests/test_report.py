"""`tdkd report`: figures and report.md from run directories."""

import json

import pytest
from PIL import Image

from .helpers import run_cli, sentiment_task, tiny_pair


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tdkd_cli.cli.app import main

    d = tmp_path_factory.mktemp("report")
    task, teacher = sentiment_task(d, n_train=48, n_dev=16), tiny_pair(d, dropout=0.0)
    out = []
    for name, extra in (("dense", ["--no-mpo"]), ("opdf-s1", ["--mpo", "--tensor-lambda", "1e-3", "--seed", "1"]),
                        ("opdf-s2", ["--mpo", "--tensor-lambda", "1e-3", "--seed", "2"])):
        with pytest.raises(SystemExit) as exc:
            main(["distill", "--data", str(task), "--teacher", str(teacher), "--student-layers", "0,1", "--batch-size", "8",
                  "--max-steps", "6", "--eval-every", "2", "--log-every", "1", "--alpha", "0.5", "--device", "cpu",
                  "-o", str(d / name), *extra])
        assert exc.value.code == 0
        out.append(d / name)
    return d, out


def test_report_writes_valid_figures_naming_every_run(runs, capsys):
    d, dirs = runs
    capsys.readouterr()
    rc, out, err = run_cli(["report", *map(str, dirs), "-o", str(d / "rep"), "--json"], capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["runs"] == ["dense", "opdf-s1", "opdf-s2"]
    assert summary["figures"] == ["losses.png", "dev.png", "spectra.png"]
    for name in summary["figures"]:
        with Image.open(d / "rep" / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200
    md = (d / "rep" / "report.md").read_text()
    assert "| best dev | final dev |" in md  # the split the runs evaluated on
    for label in summary["runs"]:
        assert f"| {label} |" in md
    for name in summary["figures"]:
        assert f"]({name})" in md
    # the MPO runs recorded their initial bond spectra; the dense one has none
    assert (dirs[1] / "spectra-init.json").is_file() and not (dirs[0] / "spectra-init.json").exists()
    spectra = json.loads((dirs[1] / "spectra-init.json").read_text())["layers"]
    assert len(spectra) == 4 and all(len(bonds) == 4 for bonds in spectra.values())  # n=5: 4 bonds


def test_report_groups_seeds_and_reads_the_trained_spectra(runs):
    from tdkd_cli.tools import report, runs as runs_mod

    d, dirs = runs
    data = [runs_mod.read_run(p, p.name) for p in dirs]
    groups = runs_mod.seed_groups(data)
    assert [[r.label for r in g] for g in groups] == [["dense"], ["opdf-s1", "opdf-s2"]]
    trained = runs_mod.trained_spectra(data[1])
    assert trained.keys() == data[1].spectra_init.keys()
    name = next(iter(trained))
    assert len(trained[name]) == 4 and trained[name][0] != data[1].spectra_init[name][0]  # training moved them


def test_report_names_the_split_the_runs_evaluated_on(runs):
    from tdkd_cli.tools import report, runs as runs_mod

    d, dirs = runs
    data = [runs_mod.read_run(p, p.name) for p in dirs]
    assert runs_mod.split_name(data) == "dev"
    data[1].recipe["dev_split"] = data[2].recipe["dev_split"] = "heldout"
    assert runs_mod.split_name(data[1:]) == "heldout" and runs_mod.split_name(data) == "eval"
    assert "| best heldout | final heldout |" in report.markdown(data[1:], ["dev.png"])


def test_report_bad_input(runs, tmp_path, capsys):
    d, dirs = runs
    rc, _, err = run_cli(["report", str(tmp_path), "-o", str(tmp_path / "rep")], capsys)
    assert rc == 2 and "is not a tdkd distill run (no metrics.jsonl)" in err and not (tmp_path / "rep").exists()
    rc, _, err = run_cli(["report", str(dirs[0]), "-o", str(d / "rep-exists")], capsys)
    assert rc == 0
    rc, _, err = run_cli(["report", str(dirs[0]), "-o", str(d / "rep-exists")], capsys)
    assert rc == 2 and "already exists" in err
