"""`tdkd export --format onnx` (verified with onnxruntime) and ONNX files in `tdkd bench`."""

import json

import numpy as np
import pytest
import torch

from .helpers import run_cli, tiny_pair, tiny_vit_dir


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    return d, tiny_pair(d, dropout=0.0), tiny_vit_dir(d / "vit")[1]


def _onnx_logits(path, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


def test_text_model_exports_with_dynamic_axes(models_dir, capsys):
    from transformers import AutoModelForSequenceClassification

    d, teacher, _ = models_dir
    rc, out, err = run_cli(["export", str(teacher), "-o", str(d / "bert.onnx"), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and report["max_rel_diff"] < 1e-5
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    for batch, seq in ((1, 5), (4, 23)):  # shapes other than the traced and the verified ones
        ids = torch.randint(1, 40, (batch, seq))
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0
        got = _onnx_logits(d / "bert.onnx", {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                             "token_type_ids": np.zeros((batch, seq), dtype=np.int64)})
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
        assert np.abs(got - ref).max() <= 1e-5 * max(np.abs(ref).max(), 1e-6)


@pytest.mark.parametrize("kind", ["vit", "cnn-mpo"])
def test_timm_models_export_and_an_mpo_checkpoint_is_contracted_first(models_dir, capsys, kind):
    d, _, vit = models_dir
    src = str(vit)
    if kind == "cnn-mpo":
        rc, _, err = run_cli(["decompose", "resnet-digits-small", "--init", "random", "--num-labels", "10",
                              "-o", str(d / "cnn-mpo")], capsys)
        assert rc == 0, err
        src = str(d / "cnn-mpo")
    rc, out, err = run_cli(["export", src, "-o", str(d / f"{kind}.onnx"), "--json"], capsys)
    assert rc == 0, err
    report = json.loads(out)
    assert report["inputs"] == ["x"] and report["max_rel_diff"] < 1e-5
    assert report["merged_from_mpo"] == (kind == "cnn-mpo")
    rc, out, err = run_cli(["bench", src, str(d / f"{kind}.onnx"), "--batch-size", "2", "--iters", "3", "--warmup", "1",
                            "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)["models"]
    assert [r["family"] for r in rows] == ["timm", "onnx"] and rows[1]["median_ms"] > 0 and rows[1]["input"] == rows[0]["input"]


def test_export_bad_input_and_failed_verification_write_nothing(models_dir, capsys):
    d, teacher, _ = models_dir
    out = d / "never.onnx"
    rc, _, err = run_cli(["export", str(teacher), "-o", str(out), "--tolerance", "1e-30"], capsys)
    assert rc == 1 and "does not match PyTorch" in err and "nothing written" in err
    assert not out.exists() and not list(d.glob(".never.onnx.tmp-*"))
    rc, _, err = run_cli(["export", str(teacher), "-o", str(out), "--format", "tflite"], capsys)
    assert rc == 2 and "--format 'tflite' is not supported" in err and not out.exists()
    rc, _, err = run_cli(["export", str(teacher), "-o", str(d / "bert2.onnx")], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(["bench", str(d / "bert2.onnx"), "--dtype", "bfloat16", "--iters", "3"], capsys)
    assert rc == 2 and "ONNX files are timed on CPU in float32" in err
    (d / "broken.onnx").write_bytes(b"not onnx")
    rc, _, err = run_cli(["bench", str(d / "broken.onnx"), "--iters", "3"], capsys)
    assert rc == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1
