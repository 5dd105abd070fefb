"""Hugging Face data (save_to_disk directories, parquet and arrow files) give the same examples,
metrics and training as the TSV files they were made from."""

import json
import shutil

import pytest

from tdkd_cli.io import data

from .helpers import run_cli, sentiment_task, tiny_pair

SAMPLE = data.resolve_data("builtin:sst2-sample")[0]


def _split(path, limit):
    t = data.load_text(path, data.get_task("sst2"), "train" if "train" in path.name else "dev", limit=limit)
    return {"sentence": [x[0] for x in t.texts], "label": t.labels}


@pytest.fixture(scope="module")
def hf_forms(tmp_path_factory):
    """The SST-2 sample (first 256 training sentences, full dev set) as TSV, save_to_disk
    DatasetDict (ClassLabel negative/positive, split 'validation'), parquet and arrow files."""
    import datasets

    d = tmp_path_factory.mktemp("hf")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    train = datasets.Dataset.from_dict(_split(SAMPLE / "train.tsv", 256), features=features)
    dev = datasets.Dataset.from_dict(_split(SAMPLE / "dev.tsv", None), features=features)
    tsv = d / "tsv" / "SST-2"
    tsv.mkdir(parents=True)
    for name, ds in (("train", train), ("dev", dev)):
        rows = "".join(f"{s}\t{y}\n" for s, y in zip(ds["sentence"], ds["label"]))
        (tsv / f"{name}.tsv").write_text("sentence\tlabel\n" + rows)
    datasets.DatasetDict({"train": train, "validation": dev}).save_to_disk(str(d / "disk"))
    (d / "parquet").mkdir()
    train.to_parquet(str(d / "parquet" / "train.parquet"))
    dev.to_parquet(str(d / "parquet" / "validation.parquet"))
    (d / "arrow").mkdir()
    for name, ds in (("train", train), ("validation", dev)):
        ds.save_to_disk(str(d / f"single-{name}"))
        (arrow,) = (d / f"single-{name}").glob("*.arrow")
        shutil.copy(arrow, d / "arrow" / f"{name}.arrow")
    return d, tsv


def test_every_form_reads_the_same_examples(hf_forms):
    d, tsv = hf_forms
    ref = data.load_text(tsv, None, "dev")
    for form in ("disk", "parquet", "arrow"):
        got = data.load_text(d / form, None, "dev")  # no task given: guessed from the GLUE column names
        assert got.texts == ref.texts, form
        # ClassLabel names order the labels; the TSV's "0"/"1" map to the same ids
        assert got.labels == ref.labels and got.label_names == ("negative", "positive"), form
    with_task = data.load_text(d / "disk", data.get_task("sst2"), "train")
    assert with_task.label_names == ("0", "1") and len(with_task) == 256
    single = data.load_text(d / "single-validation", None, "dev")  # a single Dataset: any split
    assert single.texts == ref.texts


def test_eval_and_distill_give_the_same_metrics_on_every_form(hf_forms, tmp_path, capsys):
    d, tsv = hf_forms
    teacher = tiny_pair(tmp_path, dropout=0.0)
    scores, finals = {}, {}
    for form, path in (("tsv", tsv), ("disk", d / "disk"), ("parquet", d / "parquet"), ("arrow", d / "arrow")):
        rc, out, err = run_cli(["eval", str(teacher), "--data", str(path), "--task", "sst2", "--json"], capsys)
        assert rc == 0, err
        scores[form] = json.loads(out)["metrics"]
        rc, out, err = run_cli(["distill", "--data", str(path), "--task", "sst2", "--teacher", str(teacher),
                                "--student-layers", "0,1", "--no-mpo", "--max-steps", "3", "--batch-size", "16",
                                "--dev-limit", "64", "--device", "cpu", "--json", "-o", str(tmp_path / f"run-{form}")], capsys)
        assert rc == 0, err
        finals[form] = json.loads(out)["final_metrics"]
    assert all(scores[f] == scores["tsv"] for f in scores), scores
    assert all(finals[f] == finals["tsv"] for f in finals), finals


def test_hf_data_bad_input(hf_forms, tmp_path, capsys):
    d, _ = hf_forms
    rc, _, err = run_cli(["eval", "tinybert", "--init", "random", "--data", str(d / "disk"), "--split", "test"], capsys)
    assert rc == 2 and "has no test split (its splits: train, validation)" in err
    bad = tmp_path / "train.parquet"
    bad.write_bytes(b"PAR1 not really")
    rc, _, err = run_cli(["eval", "tinybert", "--init", "random", "--data", str(bad), "--task", "sst2"], capsys)
    assert rc == 2 and "cannot read" in err and "as a Hugging Face data set" in err and len(err.strip().splitlines()) == 1
