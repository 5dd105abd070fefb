"""eval: metrics against hand computations, merged == MPO form; bench: JSON fields, regression gate."""

import json
import sys

import numpy as np
import pytest
import torch

from tdkd_cli.tools import bench, ops
from tdkd_cli.engine import evaluate
from tdkd_cli.cli.app import main
from tdkd_cli.core.errors import UsageError

from .helpers import bert_classifier, digits_folder, run_cli, tiny_vit_dir, wordpiece_tokenizer


# ---------------------------------------------------------------- metrics
def test_accuracy_f1_matthews_by_hand():
    y = [1, 0, 1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 1, 0, 1, 1]
    # tp=3 fp=2 fn=1 tn=2
    m = evaluate.compute_metrics(["accuracy", "f1", "matthews"], p, y)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["matthews"] == pytest.approx((3 * 2 - 2 * 1) / np.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1)))


def test_metric_edge_cases():
    all_wrong = evaluate.compute_metrics(["accuracy", "f1", "matthews"], [0, 1, 0, 1], [1, 0, 1, 0])
    assert all_wrong == {"accuracy": 0.0, "f1": 0.0, "matthews": pytest.approx(-1.0)}
    one_class = evaluate.compute_metrics(["accuracy", "f1", "matthews"], [1, 1, 1], [1, 1, 1])
    assert one_class["accuracy"] == 1.0 and one_class["f1"] == 1.0 and one_class["matthews"] == 0.0
    none_pos = evaluate.compute_metrics(["f1"], [0, 0], [0, 0])
    assert none_pos["f1"] == 0.0
    const = evaluate.compute_metrics(["pearson"], [1.0, 1.0, 1.0], [0.5, 1.0, 2.0])
    assert np.isnan(const["pearson"])


def test_correlations_and_topk_by_hand():
    y = [1.0, 2.0, 3.0, 4.0]
    p = [1.5, 1.9, 3.5, 3.0]
    m = evaluate.compute_metrics(["pearson", "spearman"], p, y)
    yc, pc = np.array(y) - 2.5, np.array(p) - np.mean(p)
    assert m["pearson"] == pytest.approx(float((yc * pc).sum() / np.sqrt((yc**2).sum() * (pc**2).sum())))
    assert m["spearman"] == pytest.approx(1 - 6 * (0 + 0 + 1 + 1) / (4 * 15))  # ranks p: 1,2,4,3
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = [2, 0, 1]  # top1 right only for row 1; row 0: label 2 is 2nd; row 2: label 1 is 2nd
    t = evaluate.compute_metrics(["top1", "top5"], scores.argmax(1), labels, scores)
    assert t["top1"] == pytest.approx(1 / 3) and t["top5"] == 1.0


def test_percentile_interpolates():
    assert bench.percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert bench.percentile([1.0, 2.0], 90) == pytest.approx(1.9)


# ---------------------------------------------------------------- eval end to end
SENTS = ["a gripping , beautifully acted film", "the plot is thin and the jokes fall flat", "warm funny and wise",
         "a tedious mess", "one of the best films of the year", "nothing works here", "charming and clever",
         "dull dull dull", "an absolute delight", "i wanted my money back"]


@pytest.fixture(scope="module")
def sst_setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    task = d / "SST-2"
    task.mkdir()
    rows = [f"{s}\t{1 - (i % 2)}" for i, s in enumerate(SENTS * 3)]
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    words = {w for s in SENTS for w in s.split()}
    _, model_dir = bert_classifier(d, hidden=32, layers=2, heads=4, ffn=64, vocab=64)
    wordpiece_tokenizer(model_dir, words)
    ops.decompose_model(str(model_dir), d / "mpo", n=3)
    ops.merge_checkpoint(d / "mpo", d / "merged")
    return d


def test_eval_merged_equals_mpo_form_and_dense(sst_setup, capsys):
    d = sst_setup
    results = {}
    for name in ("bert", "mpo", "merged"):
        rc, out, err = run_cli(["eval", str(d / name), "--data", str(d / "SST-2"), "--json",
                                "--predictions", str(d / f"{name}.jsonl"), "--batch-size", "7"], capsys)
        assert rc == 0, err
        results[name] = json.loads(out)
    assert results["mpo"]["task"] == "sst2" and results["mpo"]["examples"] == 30
    assert results["merged"]["metrics"] == results["mpo"]["metrics"] == results["bert"]["metrics"]
    preds = {n: [json.loads(line) for line in (d / f"{n}.jsonl").read_text().splitlines()] for n in results}
    assert [p["prediction"] for p in preds["merged"]] == [p["prediction"] for p in preds["mpo"]]
    # the reported accuracy is the accuracy of the written predictions
    acc = np.mean([p["prediction"] == p["label"] for p in preds["merged"]])
    assert results["merged"]["metrics"]["accuracy"] == pytest.approx(acc)
    worst = max(abs(a - b) for pm, pd in zip(preds["merged"], preds["mpo"]) for a, b in zip(pm["scores"], pd["scores"]))
    assert worst < 1e-4


def test_eval_bad_inputs(sst_setup, capsys, tmp_path):
    d = sst_setup
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nhello\t1\n")
    rc, _, err = run_cli(["eval", str(d / "merged"), "--data", str(bad), "--task", "sst2"], capsys)
    assert rc == 2 and "no column 'sentence'" in err
    bad.write_text("sentence\tlabel\nhello\t7\n")
    rc, _, err = run_cli(["eval", str(d / "merged"), "--data", str(bad), "--task", "sst2"], capsys)
    assert rc == 2 and "unknown label '7'" in err
    bad.write_text("sentence\tlabel\n")
    rc, _, err = run_cli(["eval", str(d / "merged"), "--data", str(bad), "--task", "sst2"], capsys)
    assert rc == 2 and "no examples" in err
    three = tmp_path / "three.jsonl"
    three.write_text("\n".join(json.dumps({"text": s, "y": "abc"[i % 3]}) for i, s in enumerate(SENTS)) + "\n")
    rc, _, err = run_cli(["eval", str(d / "merged"), "--data", str(three), "--text-column", "text", "--label-column", "y"], capsys)
    assert rc == 2 and "model has 2 output labels but task custom has 3" in err


def test_eval_images_top1_top5(tmp_path, capsys):
    root = digits_folder(tmp_path / "digits", count=40)
    _, mdir = tiny_vit_dir(tmp_path / "vit")
    rc, out, err = run_cli(["eval", str(mdir), "--data", str(root), "--json"], capsys)
    assert rc == 0, err
    r = json.loads(out)
    assert r["examples"] == 40 and set(r["metrics"]) == {"top1", "top5"}
    assert 0.0 <= r["metrics"]["top1"] <= r["metrics"]["top5"] <= 1.0
    ops.decompose_model(str(mdir), tmp_path / "vit-mpo", n=3)
    rc, out2, err = run_cli(["eval", str(tmp_path / "vit-mpo"), "--data", str(root), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out2)["metrics"] == r["metrics"]


# ---------------------------------------------------------------- bench
BENCH_FIELDS = {"name", "family", "params", "weights_mb", "median_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms",
                "throughput_per_s", "peak_mem_mb", "latency_ratio", "speedup", "params_ratio"}


@pytest.fixture(scope="module")
def bench_report(sst_setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    d = sst_setup
    with pytest.raises(SystemExit) as exc:
        main(["bench", str(d / "bert"), str(d / "mpo"), str(d / "merged"), "--iters", "3", "--warmup", "1",
              "--seq-len", "16", "--batch-size", "2", "--threads", "1", "--output", str(out)])
    assert exc.value.code == 0
    return json.loads(out.read_text()), out


def test_bench_json_fields(bench_report):
    report, _ = bench_report
    assert report["schema"] == "tdkd-bench/1"
    assert report["settings"] == {"device": "cpu", "batch_size": 2, "seq_len": 16, "dtype": "float32", "warmup": 1, "iters": 3}
    assert len(report["models"]) == 3
    for m in report["models"]:
        assert BENCH_FIELDS <= set(m)
        assert m["min_ms"] <= m["median_ms"] <= m["p90_ms"] <= m["p99_ms"]
        if sys.platform == "linux":
            assert m["peak_mem_mb"] is not None and m["peak_mem_mb"] >= 0
    dense, mpo_, merged = report["models"]
    assert dense["latency_ratio"] == 1.0 and dense["speedup"] == 1.0
    assert merged["params"] == dense["params"] < mpo_["params"]


def test_regression_gate(bench_report, tmp_path, capsys):
    report, path = bench_report
    slow = {"models": [{**m, "median_ms": m["median_ms"] * 1000, "latency_ratio": m["latency_ratio"] * 1000} for m in report["models"]]}
    fast = {"models": [{**m, "median_ms": m["median_ms"] / 1000, "latency_ratio": m["latency_ratio"] / 1000} for m in report["models"]]}
    (tmp_path / "slow.json").write_text(json.dumps(slow))
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    checks = bench.regression_check(report, slow, 0.10)
    assert all(c["status"] == "ok" for c in checks)
    checks = bench.regression_check(report, fast, 0.10, gate="ratio")
    assert [c["status"] for c in checks] == ["regressed"] * 3
    # end to end: the CLI exits 1 against a baseline that was far faster, 0 against a slower one
    names = [m["name"] for m in report["models"]][:1]
    rc, out, err = run_cli(["bench", *names, "--iters", "3", "--warmup", "0", "--seq-len", "8", "--batch-size", "1",
                            "--baseline", str(tmp_path / "fast.json"), "--json"], capsys)
    assert rc == 1 and "regression" in err and json.loads(out)["regression"]["passed"] is False
    rc, out, err = run_cli(["bench", *names, "--iters", "3", "--warmup", "0", "--seq-len", "8", "--batch-size", "1",
                            "--baseline", str(tmp_path / "slow.json"), "--json"], capsys)
    assert rc == 0 and json.loads(out)["regression"]["passed"] is True
    (tmp_path / "junk.json").write_text("[1, 2]")
    rc, _, err = run_cli(["bench", *names, "--baseline", str(tmp_path / "junk.json")], capsys)
    assert rc == 2 and "not a tdkd bench report" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_bench_cuda_without_cuda(capsys):
    rc, _, err = run_cli(["bench", "tinybert", "--init", "random", "--device", "cuda"], capsys)
    assert rc == 2 and err.strip() == ("error: --device cuda: CUDA is not available on this machine "
                                       "(torch.cuda.is_available() is False); use --device cpu")


def test_bench_bad_options(capsys):
    with pytest.raises(UsageError):
        bench.regression_check({"models": []}, {"models": []}, -1)
    rc, _, err = run_cli(["bench", "tinybert", "--init", "random", "--dtype", "int8"], capsys)
    assert rc == 2 and "--dtype" in err
