"""decompose -> merge round trips on real HF and timm model classes, via the CLI entry point."""

import json

import pytest
import torch

from tdkd_cli.io import checkpoint, model_files, models
from tdkd_cli.tools import ops
from tdkd_cli.tensor import tensorize

from .helpers import bert_classifier, rel_fro, vit_tiny, run_cli


def _hf_logits(model, vocab=1000):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (3, 20), generator=g)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("hidden,layers,ffn,heads", [(768, 2, 3072, 12), (312, 4, 1200, 12)])
def test_hf_bert_roundtrip(tmp_path, capsys, hidden, layers, ffn, heads):
    from transformers import AutoModelForSequenceClassification

    original, src = bert_classifier(tmp_path, hidden=hidden, layers=layers, heads=heads, ffn=ffn)
    code, out, err = run_cli(["decompose", str(src), "-o", str(tmp_path / "mpo"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["totals"]["layers"] == 6 * layers
    assert report["totals"]["max_rel_error"] < 1e-6
    if hidden == 768:
        q = next(L for L in report["layers"] if L["name"].endswith("layer.0.attention.self.query"))
        assert q["out_shape"] == [32, 1, 1, 1, 24] and q["mpo_params"] == 1_916_928
        ffn_in = next(L for L in report["layers"] if L["name"].endswith("layer.0.intermediate.dense"))
        assert ffn_in["out_shape"] == [64, 1, 1, 1, 48] and ffn_in["mpo_params"] == 7_667_712

    code, out, err = run_cli(["merge", str(tmp_path / "mpo"), "-o", str(tmp_path / "merged"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["max_abs_diff"] < 1e-5

    # The merged directory loads with plain transformers code, no tdkd involved.
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ref_state, new_state = original.state_dict(), merged.state_dict()
    assert set(ref_state) == set(new_state)
    for key, ref in ref_state.items():
        assert rel_fro(new_state[key], ref) <= 1e-6, key
    assert float((_hf_logits(merged) - _hf_logits(original)).abs().max()) <= 1e-5


def test_timm_vit_roundtrip(tmp_path, capsys):
    import timm
    from safetensors.torch import load_file

    original, weights = vit_tiny(tmp_path)
    code, out, err = run_cli(["decompose", "vit_tiny_patch16_224", "--weights", str(weights),
                              "-o", str(tmp_path / "mpo"), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["totals"]["layers"] == 48
    names = {L["name"].split(".", 2)[-1] for L in report["layers"]}
    assert names == {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}
    code, out, err = run_cli(["merge", str(tmp_path / "mpo"), "-o", str(tmp_path / "merged")], capsys)
    assert code == 0, err

    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))  # strict
    for key, ref in original.state_dict().items():
        assert rel_fro(fresh.state_dict()[key], ref) <= 1e-6, key
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float((fresh(x) - original(x)).abs().max()) <= 1e-5


def test_mpo_forward_equals_dense_and_hf_saving_still_works(tmp_path):
    original, src = bert_classifier(tmp_path, hidden=64, layers=2, heads=4, ffn=128)
    loaded = models.load_model(str(src))
    names = tensorize.select_targets(loaded.model, tensorize.BERT_TARGETS)
    plans = tensorize.plan_layers(loaded.model, names, 4)
    tensorize.tensorize(loaded.model, plans)
    assert len(tensorize.mpo_modules(loaded.model)) == 12
    assert type(loaded.model).__name__ == "BertForSequenceClassification"  # class kept
    assert float((_hf_logits(loaded.model) - _hf_logits(original)).abs().max()) < 1e-5
    tensorize.merge(loaded.model)
    assert not tensorize.mpo_modules(loaded.model)
    loaded.model.save_pretrained(tmp_path / "plain")
    from transformers import BertForSequenceClassification

    again = BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    assert float((_hf_logits(again) - _hf_logits(original)).abs().max()) < 1e-5


def test_manifest_records_layers_and_source(tmp_path, capsys):
    _, src = bert_classifier(tmp_path, hidden=48, layers=1, heads=4, ffn=96)
    code, _, err = run_cli(["decompose", str(src), "-o", str(tmp_path / "mpo"), "--n", "3",
                            "--shapes", "48=4,2,6", "--targets", "*.attention.self.query"], capsys)
    assert code == 0, err
    m = checkpoint.read_manifest(tmp_path / "mpo")
    assert m["format"] == "tdkd-mpo" and m["format_version"] == 1
    assert m["source"]["family"] == "hf" and m["source"]["config"]["hidden_size"] == 48
    (name, L), = m["layers"].items()
    assert name.endswith("layer.0.attention.self.query")
    assert L["out_shape"] == [4, 2, 6] and L["in_shape"] == [4, 2, 6] and L["central"] == 1
    assert L["bonds"] == [1, 16, 36, 1] and L["dtype"] == "float32"


PAPER_TOTALS = {3: 114_732_290, 4: 138_620_162, 5: 162_508_034, 6: 186_395_906, 7: 210_283_778}


def test_paper_model_parameter_counts():
    """6-layer BERT-base-width classifier: dense 66,956,546; all six matrices per layer at n=3..7."""
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(num_hidden_layers=6, num_labels=2))
    dense = sum(p.numel() for p in model.parameters())
    assert dense == 66_956_546
    names = tensorize.select_targets(model, tensorize.default_targets(model, "hf"))
    assert len(names) == 36
    for n, expected in PAPER_TOTALS.items():
        plans = tensorize.plan_layers(model, names, n)
        total = dense - sum(p.dense_params for p in plans) + sum(p.mpo_params for p in plans)
        assert total == expected, n


def test_actual_cores_match_planned_count(tmp_path):
    original, src = bert_classifier(tmp_path, hidden=96, layers=1, heads=4, ffn=384)
    report = ops.decompose_model(str(src), tmp_path / "mpo", n=5)
    loaded, _ = model_files.load_mpo_model(tmp_path / "mpo")
    assert ops.model_param_count(loaded.model) == report["totals"]["model_params_after"]
    planned = sum(p.numel() for p in original.parameters()) - report["totals"]["dense_params_targets"] + report["totals"]["mpo_params_targets"]
    assert planned == report["totals"]["model_params_after"]
