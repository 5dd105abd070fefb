"""The checkpoint format: manifest validation, checksums, atomic outputs, safetensors header checks."""

import json
import shutil

import pytest

from tdkd_cli.io import checkpoint
from tdkd_cli.tools import ops
from tdkd_cli.core.errors import CheckpointError, TdkdError

from .helpers import bert_classifier


@pytest.fixture(scope="module")
def mpo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    _, src = bert_classifier(d, hidden=48, layers=1, heads=4, ffn=96)
    ops.decompose_model(str(src), d / "mpo", n=3)
    return d / "mpo"


def _copy(mpo_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(mpo_dir, dst)
    return dst


def test_valid_checkpoint_loads(mpo_dir):
    manifest, tensors = checkpoint.load_mpo_checkpoint(mpo_dir)
    assert len(manifest["layers"]) == 6
    for name, L in manifest["layers"].items():
        for k in range(3):
            assert tuple(tensors[checkpoint.core_key(name, k)].shape) == (L["bonds"][k], L["out_shape"][k], L["in_shape"][k], L["bonds"][k + 1])
        assert f"{name}.weight" not in tensors and f"{name}.bias" in tensors


@pytest.mark.parametrize("mutate,needle", [
    (lambda m: m.update(format_version=99), "newer"),
    (lambda m: m.update(format="something-else"), "format"),
    (lambda m: next(iter(m["layers"].values())).update(bonds=[1, 5, 1]), "bonds"),
    (lambda m: next(iter(m["layers"].values())).update(out_shape=[4, 2, 5]), "multiply"),
    (lambda m: next(iter(m["layers"].values())).update(bonds=[1, 17, 36, 1]), "shape"),
    (lambda m: next(iter(m["layers"].values())).update(dtype="int8"), "dtype"),
    (lambda m: m["source"].update(family="keras"), "family"),
])
def test_manifest_mutations_are_rejected(mpo_dir, tmp_path, mutate, needle):
    d = _copy(mpo_dir, tmp_path)
    m = json.loads((d / "tdkd.json").read_text())
    mutate(m)
    (d / "tdkd.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=needle):
        checkpoint.load_mpo_checkpoint(d)


def test_checksum_catches_a_flipped_byte(mpo_dir, tmp_path):
    d = _copy(mpo_dir, tmp_path)
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load_mpo_checkpoint(d)


def test_manifest_not_json(mpo_dir, tmp_path):
    d = _copy(mpo_dir, tmp_path)
    (d / "tdkd.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.read_manifest(d)


def test_atomic_dir_cleans_up_and_keeps_existing(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_dir(target, force=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with checkpoint.atomic_dir(target, force=True) as tmp:
        (tmp / "new.txt").write_text("done")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("payload", [b"", b"\x00" * 7, b"\xff" * 8 + b"{}", (20).to_bytes(8, "little") + b'{"a": {"dtype": 1}}  ',
                                     (40).to_bytes(8, "little") + b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'[:40]])
def test_safetensors_header_checks(tmp_path, payload):
    f = tmp_path / "x.safetensors"
    f.write_bytes(payload)
    with pytest.raises(TdkdError):
        checkpoint.load_tensors(f)


def test_wrong_kind_detection(mpo_dir, tmp_path):
    assert checkpoint.detect_kind(mpo_dir) == "mpo"
    assert checkpoint.detect_kind(mpo_dir.parent / "bert") == "hf"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError):
        checkpoint.detect_kind(tmp_path / "empty")
