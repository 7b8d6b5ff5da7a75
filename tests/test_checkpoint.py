import json

import pytest
import torch

from quantlrm.checkpoint import Checkpoint, ShardedWriter, atomic_output_dir
from quantlrm.errors import QuantLRMError
from quantlrm.models import build_model, tiny_config


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    model = build_model(tiny_config("llama"))
    model.save_pretrained(d, max_shard_size="60KB")
    return d, model


def test_reads_every_tensor_of_a_sharded_checkpoint(sharded):
    d, model = sharded
    ck = Checkpoint(d)
    assert len(ck.shard_files()) > 1
    sd = model.state_dict()
    for k in ck.keys():
        torch.testing.assert_close(ck.get(k), sd[k])
    assert ck.info("model.layers.0.mlp.down_proj.weight")[0] == [64, 128]


def test_errors_name_the_problem(tmp_path, sharded):
    with pytest.raises(QuantLRMError, match="config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(QuantLRMError, match="pickle"):
        Checkpoint(tmp_path)
    (tmp_path / "pytorch_model.bin").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(QuantLRMError, match="truncated or corrupted"):
        Checkpoint(tmp_path)


def test_writer_shards_and_atomic_dir(tmp_path):
    out = tmp_path / "out"
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}
    with atomic_output_dir(out) as tmp:
        w = ShardedWriter(tmp, max_shard_bytes=800)
        for k, v in tensors.items():
            w.add(k, v)
        w.close()
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    ck = Checkpoint(out)
    for k, v in tensors.items():
        torch.testing.assert_close(ck.get(k), v)
    with pytest.raises(QuantLRMError, match="not empty"):
        with atomic_output_dir(out):
            pass
    # a failure leaves nothing behind
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "never"):
            raise RuntimeError("boom")
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
