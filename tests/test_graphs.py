"""Graph distillation: graph data (shipped, .npz, CSV), PyG models (GCN, GraphSAGE, GAT, MLP) as
dense and MPO students, GLNN / LSP / feature and relation methods on node embeddings, merge to
plain PyG, eval and bench on nodes, ONNX export of an MLP student, bitwise resume, bad input."""

import json
import shutil

import numpy as np
import pytest
import torch

from .helpers import run_cli


def _toy_graph(path, n=90, f=12, classes=3, seed=0):
    """A small homophilous graph: class-dependent features, most edges inside a class, a split of
    5 training nodes per class, 30 validation and 45 test nodes."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = (rng.random((n, f)) < 0.15 + 0.5 * (np.arange(f)[None, :] % classes == y[:, None])).astype(np.uint8)
    src = rng.integers(0, n, 4 * n)
    same = rng.random(4 * n) < 0.8
    dst = np.where(same, (src + classes * rng.integers(1, n // classes, 4 * n)) % n, rng.integers(0, n, 4 * n))
    keep = src != dst
    ei = np.stack([np.r_[src[keep], dst[keep]], np.r_[dst[keep], src[keep]]]).astype(np.int64)
    order = rng.permutation(n)
    train = np.sort(np.concatenate([order[y[order] == c][:5] for c in range(classes)]))
    rest = np.setdiff1d(order, train)
    arrays = dict(x=x, y=y.astype(np.int64), edge_index=ei, train_idx=train, val_idx=rest[:30], test_idx=rest[30:75])
    np.savez(path, **arrays)
    return arrays


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    arrays = _toy_graph(d / "toy.npz")
    return d, d / "toy.npz", arrays


def _distill(run, data, capsys, *extra):
    return run_cli(["distill", "--data", str(data), "--epochs", "12", "--log-every", "1", "--device", "cpu",
                    "--json", "-o", str(run), *extra], capsys)


def test_builtin_graphs_load_checked_and_row_normalised():
    from tdkd_cli.io import graphs

    for name, nodes, feats, classes, edges in (("cora", 2708, 1433, 7, 10556), ("citeseer", 3327, 3703, 6, 9104)):
        g = graphs.load(f"builtin:{name}")
        assert (g.num_nodes, g.x.shape[1], g.num_classes, g.edge_index.shape[1]) == (nodes, feats, classes, edges)
        assert [len(g.splits[s]) for s in ("train", "val", "test")] == [20 * classes, 500, 1000]
        sums = g.x.sum(1)
        assert torch.allclose(sums[sums > 0], torch.ones_like(sums[sums > 0]))
        assert graphs.is_graph_data(f"builtin:{name}")


def test_csv_and_parquet_forms_read_as_the_npz_form(toy, tmp_path):
    from tdkd_cli.core.errors import UsageError
    from tdkd_cli.io import graphs

    _, npz, a = toy
    d = tmp_path / "csvgraph"
    d.mkdir()
    split = np.array([""] * len(a["y"]), dtype=object)
    for s in ("train", "val", "test"):
        split[a[f"{s}_idx"]] = s
    cols = [f"f{j}" for j in range(a["x"].shape[1])]
    rows = [",".join([f"n{i}", str(a["y"][i]), split[i], *map(str, a["x"][i])]) for i in range(len(a["y"]))]
    (d / "nodes.csv").write_text("id,label,split," + ",".join(cols) + "\n" + "\n".join(rows) + "\n")
    ei = a["edge_index"][:, : a["edge_index"].shape[1] // 2]  # one direction: tdkd adds the other
    (d / "edges.csv").write_text("source,target\n" + "\n".join(f"n{s},n{t}" for s, t in ei.T) + "\n")
    g_csv, g_npz = graphs.load(str(d)), graphs.load(str(npz))
    assert torch.equal(g_csv.x, g_npz.x) and torch.equal(g_csv.y, g_npz.y)
    assert torch.equal(g_csv.edge_index, g_npz.edge_index)
    assert all(torch.equal(g_csv.splits[s], g_npz.splits[s]) for s in ("train", "val", "test"))
    # the same tables as Parquet (typed columns: integer labels, float features, a null split)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pdir = tmp_path / "parquetgraph"
    pdir.mkdir()
    node_cols = {"id": [f"n{i}" for i in range(len(a["y"]))], "label": [float(v) for v in a["y"]],  # as a dataframe with nulls
                 "split": [s or None for s in split], **{c: a["x"][:, j].astype(float) for j, c in enumerate(cols)}}
    pq.write_table(pa.table(node_cols), pdir / "nodes.parquet")
    pq.write_table(pa.table({"source": [f"n{s}" for s in ei[0]], "target": [f"n{t}" for t in ei[1]]}), pdir / "edges.parquet")
    assert graphs.is_graph_data(str(pdir))
    g_pq = graphs.load(str(pdir))
    assert torch.equal(g_pq.x, g_npz.x) and torch.equal(g_pq.y, g_npz.y) and torch.equal(g_pq.edge_index, g_npz.edge_index)
    assert all(torch.equal(g_pq.splits[s], g_npz.splits[s]) for s in ("train", "val", "test"))
    assert [graphs._cell(v) for v in (12.0, -1.0, None, 0.25, 7)] == ["12", "-1", "", "0.25", "7"]
    (pdir / "edges.parquet").write_bytes(b"not parquet")
    with pytest.raises(UsageError, match="cannot read"):
        graphs.load(str(pdir))


def _bad_npz(path, a, **change):
    arrays = {k: v for k, v in a.items() if k not in change or change[k] is not None}
    arrays.update({k: v for k, v in change.items() if v is not None})
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,change,message", [
    ("object", {"x": np.array([{"a": 1}] * 90, dtype=object)}, "object arrays"),
    ("missing", {"train_idx": None}, "missing array 'train_idx'"),
    ("edges", {"edge_index": np.array([[0, 1], [1, 500]])}, "names node 500"),
    ("overlap", {"val_idx": np.array([0, 1, 2, 3])}, "overlap"),
    ("labels", {"y": np.full(90, -3)}, "out of range"),
])
def test_bad_graph_files_are_one_line_exit_2_nothing_written(toy, tmp_path, capsys, case, change, message):
    _, _, a = toy
    a = dict(a)
    if case == "overlap":
        change = {"val_idx": np.r_[a["train_idx"][:1], a["val_idx"][1:]]}
    path = _bad_npz(tmp_path / f"{case}.npz", a, **change)
    rc, _, err = _distill(tmp_path / "run", path, capsys, "--teacher", "none", "--student", "gcn")
    assert rc == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()


def test_csv_edge_naming_a_missing_node_is_refused(tmp_path, capsys):
    d = tmp_path / "g"
    d.mkdir()
    (d / "nodes.csv").write_text("id,label,split,f0,f1\na,0,train,1,0\nb,1,train,0,1\n")
    (d / "edges.csv").write_text("source,target\na,b\nb,zz\n")
    rc, _, err = _distill(tmp_path / "run", d, capsys, "--teacher", "none", "--student", "mlp")
    assert rc == 2 and "names node 'zz'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_gcn_teacher_then_mpo_mlp_student_glnn_merge_eval_bench_export(toy, capsys):
    from safetensors.torch import load_file
    from torch_geometric.nn.models import GCN, MLP

    from tdkd_cli.io import graphs

    d, data, _ = toy
    # a GCN teacher with the graph defaults (lr 0.01, AdamW, dropout 0.5, validation every epoch), dense
    rc, out, err = _distill(d / "t", data, capsys, "--teacher", "none", "--student", "gcn:hidden=16", "--epochs", "30")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["steps"] == 30 and rep["params_training"] == rep["params_inference"]  # dense without a teacher
    assert rep["best"]["metric"] == "accuracy" and rep["best"]["value"] > 0.6, rep["best"]
    # an MPO MLP student: KD on every node (GLNN) + the tensor constraint (MLP layer i <-> GCN layer i)
    rc, out, err = _distill(d / "s", data, capsys, "--teacher", str(d / "t" / "best"), "--student", "mlp:hidden=16",
                            "--tensor-lambda", "1", "--epochs", "30")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["aligned_cores"] == 8 and rep["params_training"] > rep["params_inference"]
    recs = [json.loads(x) for x in (d / "s" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert recs[0]["ce"] == 0 and all(r["kd"] > 0 and r["tensor"] > 0 for r in recs)
    assert recs[-1]["kd"] < recs[0]["kd"]
    # merged: plain PyG modules equal to the MPO form; loadable with PyG alone
    for name, cls in (("t", GCN), ("s", MLP)):
        rc, out, err = run_cli(["merge", str(d / name / "best"), "-o", str(d / f"{name}-merged"), "--json"], capsys)
        assert rc == 0, err
        assert json.loads(out)["max_rel_diff"] < 1e-5
        cfg = json.loads((d / f"{name}-merged" / "config.json").read_text())
        plain = cls(**cfg["kwargs"]).eval()
        plain.load_state_dict(load_file(str(d / f"{name}-merged" / "model.safetensors")))
        g = graphs.load(str(data))
        logits = plain(g.x) if cls is MLP else plain(g.x, g.edge_index)
        scores = []
        for model in (d / name / "best", d / f"{name}-merged"):
            rc, out, err = run_cli(["eval", str(model), "--data", str(data), "--json"], capsys)
            assert rc == 0, err
            scores.append(json.loads(out)["metrics"])
        assert scores[0] == scores[1] and set(scores[0]) == {"accuracy", "val_accuracy"}
        test = g.splits["test"]
        assert abs(scores[1]["accuracy"] - float((logits[test].argmax(-1) == g.y[test]).double().mean())) < 1e-9
    # bench: the GCN on the test nodes' 2-hop subgraph, the MLP on their features
    rc, out, err = run_cli(["bench", str(d / "t-merged"), str(d / "s-merged"), "--data", str(data), "--iters", "3",
                            "--warmup", "1", "--json"], capsys)
    assert rc == 0, err
    rows = json.loads(out)["models"]
    assert "2-hop subgraph" in rows[0]["input"] and "features" in rows[1]["input"]
    assert all(r["median_ms"] > 0 for r in rows)
    # export: the MLP student as ONNX, verified with onnxruntime
    rc, out, err = run_cli(["export", str(d / "s-merged"), "-o", str(d / "s.onnx"), "--json"], capsys)
    assert rc == 0, err
    assert (d / "s.onnx").is_file() and json.loads(out)["max_rel_diff"] < 1e-4


@pytest.mark.parametrize("spec", ["gcn:hidden=8", "sage:hidden=8", "gat:hidden=4,heads=2", "mlp:hidden=8,layers=3"])
def test_every_weight_matrix_of_a_pyg_model_tensorizes_and_merges_exactly(spec):
    from tdkd_cli.io import graph_models
    from tdkd_cli.tensor import align, tensorize
    from tdkd_cli.tools.ops import merge_model

    model, _ = graph_models.load_preset(spec, 20, 4, seed=0)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    plans = align.overparameterize(model, "pyg", n=4)
    linears = [n for n, m in model.named_modules() if isinstance(m, tensorize.linear_types())]
    assert sorted(p.name for p in plans) == sorted(linears) and len(linears) >= 2
    assert all(".parametrizations.weight.original" in k or not k.endswith("weight") for k in model.state_dict())
    probe = graph_models.probe_inputs(model, nodes=12, seed=3)
    report = merge_model(model, "pyg", probe, tolerance=1e-5)
    assert report["max_rel_diff"] < 1e-5 and len(report["layers"]) == len(linears)
    assert all(torch.allclose(model.state_dict()[k], v, atol=1e-5) for k, v in dense.items())


def test_gcn_mpo_student_with_lsp_fitnet_and_rkd_resumes_bitwise(toy, capsys):
    from safetensors.torch import load_file

    d, data, _ = toy
    rc, _, err = _distill(d / "t2", data, capsys, "--teacher", "none", "--student", "gcn:hidden=16", "--epochs", "5")
    assert rc == 0, err
    args = ["--teacher", str(d / "t2" / "best"), "--student", "gcn:hidden=8", "--tensor-lambda", "0.1",
            "--method", "lsp:weight=1,student=convs.0,teacher=convs.0",
            "--method", "fitnet:weight=1,student=convs.0,teacher=convs.0",
            "--method", "rkd:weight=1,student=convs.0,teacher=convs.0", "--max-steps", "6",
            "--save-every", "1", "--keep-last", "9"]
    rc, out, err = _distill(d / "full", data, capsys, *args)
    assert rc == 0, err
    recs = [json.loads(x) for x in (d / "full" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert all(r["lsp"] > 0 and r["fitnet"] > 0 and r["rkd"] > 0 and r["tensor"] > 0 for r in recs)
    half = d / "half"
    shutil.copytree(d / "full", half)
    for step in (4, 5, 6):
        shutil.rmtree(half / "checkpoints" / f"step-{step:07d}")
    rc, _, err = _distill(half, data, capsys, *args, "--resume")
    assert rc == 0, err
    for name in ("model.safetensors", "trainer_state.safetensors"):
        a = load_file(str(d / "full" / "checkpoints" / "step-0000006" / name))
        b = load_file(str(half / "checkpoints" / "step-0000006" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_inductive_setting_hides_test_edges_and_test_nodes_from_the_loss(toy):
    from tdkd_cli.engine import graph_batch
    from tdkd_cli.io import graphs

    _, data, _ = toy
    g = graphs.load(str(data))
    test = set(g.splits["test"].tolist())
    b = graph_batch.batch(g, graph_batch.loss_nodes(g, "inductive"), "inductive", "cpu")
    assert not test & set(b["edge_index"].flatten().tolist()) and not test & set(b["nodes"].tolist())
    assert b["edge_index"].shape[1] < g.edge_index.shape[1]
    bt = graph_batch.batch(g, graph_batch.loss_nodes(g, "transductive"), "transductive", "cpu")
    assert len(bt["nodes"]) == g.num_nodes and (bt["labels"] != -100).sum() == len(g.splits["train"])


def test_lsp_is_zero_for_equal_structure_and_positive_otherwise():
    from tdkd_cli.methods.method_losses import lsp_loss

    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, generator=g)
    ei = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 4], [1, 2, 3, 0, 2, 0, 0, 5]])
    for kernel in ("rbf", "linear", "poly"):
        assert abs(float(lsp_loss(z, z, ei, kernel))) < 1e-6
        assert float(lsp_loss(z, torch.randn(10, 7, generator=g), ei, kernel)) > 1e-3


def test_lsp_matches_the_formula_node_by_node_in_both_directions():
    """LS_i = softmax over i's neighbours j of -||z_i - z_j||^2; loss = mean over nodes with
    neighbours of KL(LS^S_i || LS^T_i) (kl=student) or KL(LS^T_i || LS^S_i) (kl=teacher)."""
    from tdkd_cli.methods.method_losses import lsp_loss

    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(6, 3, generator=g), torch.randn(6, 5, generator=g)
    ei = torch.tensor([[0, 0, 0, 1, 1, 3], [1, 2, 4, 0, 5, 2]])  # row 0: the node whose neighbours row 1 lists
    per_node = {"student": [], "teacher": []}
    for i in sorted(set(ei[0].tolist())):
        nb = ei[1][ei[0] == i]
        ps = torch.softmax(-((zs[i] - zs[nb]) ** 2).sum(1), 0)
        pt = torch.softmax(-((zt[i] - zt[nb]) ** 2).sum(1), 0)
        per_node["student"].append(float((ps * (ps / pt).log()).sum()))
        per_node["teacher"].append(float((pt * (pt / ps).log()).sum()))
    for direction, values in per_node.items():
        expected = sum(values) / len(values)
        assert abs(float(lsp_loss(zs, zt, ei, "rbf", direction)) - expected) < 1e-5, direction
    assert abs(per_node["student"][0] - per_node["teacher"][0]) > 1e-3  # the two directions differ here


def test_a_method_needing_a_hidden_layer_the_mlp_lacks_and_a_text_model_are_refused(toy, tmp_path, capsys):
    from .helpers import tiny_pair

    d, data, _ = toy
    rc, _, err = _distill(d / "t3", data, capsys, "--teacher", "none", "--student", "gcn:hidden=8", "--epochs", "2")
    assert rc == 0, err
    rc, _, err = _distill(tmp_path / "r1", data, capsys, "--teacher", str(d / "t3" / "best"), "--student", "mlp",
                          "--method", "fitnet:student=convs.0,teacher=convs.0")
    assert rc == 2 and err.startswith("error: ") and "convs.0" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r1").exists()
    bert = tiny_pair(tmp_path, teacher_layers=1)
    capsys.readouterr()  # what saving the tiny BERT printed
    rc, _, err = _distill(tmp_path / "r2", data, capsys, "--teacher", "none", "--student", str(bert))
    assert rc == 2 and "graph data needs a graph model" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r2").exists()
    for i, (method, teacher) in enumerate((("crd:student=convs.0,teacher=convs.0,nce_k=4", str(d / "t3" / "best")),
                                           ("dml:peers=2", "none"))):
        rc, _, err = _distill(tmp_path / f"r{3 + i}", data, capsys, "--teacher", teacher,
                              "--student", "gcn:hidden=8", "--method", method)
        assert rc == 2 and "not supported on graph data" in err and err.count("\n") == 1, err
        assert not (tmp_path / f"r{3 + i}").exists()
