"""Packed exports: each layout is unpacked here independently (from its documented layout)
and, where a library can read it on CPU, by the library; loaded models give fake-quant logits."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantlrm.errors import QuantLRMError
from quantlrm.export import get_writer
from quantlrm.export.packing import pack_dense, stored_dequant
from quantlrm.models import build_model, tiny_config
from quantlrm.quantizer import QuantResult, quantize

G = 32

# transformers warns that the checkpoint already has a quantization_config; that is expected
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")


# ---------------------------------------------------------------- helpers ----------
def tiny(dtype=torch.float32, seed=0):
    return build_model(tiny_config("llama"), seed=seed, dtype=dtype)


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def quantize_linears(model, bits, g=G) -> dict[str, QuantResult]:
    return {n: quantize(model.get_submodule(n).weight.data.float(), bits, g) for n in linear_names(model)}


def export(model, qr, fmt, bits, out: Path, g=G) -> Path:
    """Stream a model through a writer the way the pipeline does."""
    w = get_writer(fmt, out, bits, g)
    for name, t in model.state_dict().items():
        mod = name.removesuffix(".weight")
        if mod in qr:
            w.add_linear(mod, qr[mod], t.dtype)
        else:
            w.add_tensor(name, t)
    w.close(json.loads(model.config.to_json_string()))
    return out


def fake_model(model, qr, weight_of):
    """A copy of `model` whose quantized linears hold `weight_of(q)`."""
    fm = tiny(model.dtype)
    fm.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, q in qr.items():
            fm.get_submodule(n).weight.copy_(weight_of(q))
    return fm


def bits_reference(words: torch.Tensor, bits: int, n: int) -> list[int]:
    """Read n values from one row of int32 words, value j at global bits [j*bits, (j+1)*bits)."""
    ws = [int(x) & 0xFFFFFFFF for x in words.tolist()]
    vals = []
    for j in range(n):
        v = 0
        for t in range(bits):
            p = j * bits + t
            v |= ((ws[p // 32] >> (p % 32)) & 1) << t
        vals.append(v)
    return vals


def gptq3_reference(w0: int, w1: int, w2: int) -> list[int]:
    """GPTQ's 3-bit word triple as its kernels decode it: 10 values, one straddler, 10, one, 10."""
    w0, w1, w2 = (x & 0xFFFFFFFF for x in (w0, w1, w2))
    vals = [(w0 >> (3 * i)) & 7 for i in range(10)]
    vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
    vals += [(w1 >> (3 * i + 1)) & 7 for i in range(10)]
    vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
    vals += [(w2 >> (3 * i + 2)) & 7 for i in range(10)]
    return vals


def unpack_gptq_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """[in*bits/32, out] -> [in, out], written from the GPTQ layout (not from pack_dense)."""
    cols = []
    for c in range(packed.shape[1]):
        col = [int(x) for x in packed[:, c].tolist()]
        vals = []
        if bits == 3:
            for k in range(0, len(col), 3):
                vals += gptq3_reference(*col[k : k + 3])
        else:
            for word in col:
                vals += [((word & 0xFFFFFFFF) >> (bits * i)) & (2**bits - 1) for i in range(32 // bits)]
        cols.append(vals)
    return torch.tensor(cols).t()


# ---------------------------------------------------------------- packing ----------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_dense_matches_bit_by_bit_reading(bits):
    torch.manual_seed(bits)
    n = 70  # not a multiple of 32: the last word is partial
    v = torch.randint(0, 2**bits, (3, n))
    packed = pack_dense(v, bits, dim=1)
    assert packed.dtype == torch.int32 and packed.shape == (3, -(-n * bits // 32))
    for r in range(3):
        assert bits_reference(packed[r], bits, n) == v[r].tolist()
    # along dim 0 it is the transpose
    assert torch.equal(pack_dense(v.t(), bits, dim=0), packed.t())


def test_pack_dense_in_row_chunks_is_the_same(monkeypatch):
    import quantlrm.export.packing as packing

    v = torch.randint(0, 8, (37, 96))
    whole = pack_dense(v, 3)
    monkeypatch.setattr(packing, "_CHUNK", 500)  # 5 rows per chunk
    assert torch.equal(pack_dense(v, 3), whole)


# ------------------------------------------------------- compressed-tensors --------
def library_reference(model, qr, bits, dtype, out: Path, g=G):
    """What compressed-tensors' own ModelCompressor writes for the same scales/zeros/codes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    m = tiny(dtype)
    m.load_state_dict(model.state_dict())
    if g == -1:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=g)
    cfg = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"],
        format="pack-quantized",
    )
    apply_quantization_config(m, cfg)
    off = 2 ** (bits - 1)  # the library's integers are signed
    with torch.no_grad():
        for n, q in qr.items():
            mod = m.get_submodule(n)
            mod.weight_scale.copy_(q.scale.to(dtype))
            mod.weight_zero_point.copy_((q.zero.to(torch.int32) - off).to(mod.weight_zero_point.dtype))
            mod.weight.copy_(stored_dequant(q, dtype).to(dtype))
    comp = ModelCompressor.from_pretrained_model(m, "pack-quantized")
    comp.compress_model(m)
    m.save_pretrained(out)
    comp.update_config(out)
    return load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("bits,dtype,g", [(2, torch.float32, G), (3, torch.float32, G), (3, torch.bfloat16, G),
                                          (4, torch.bfloat16, G), (8, torch.float32, G), (4, torch.float32, -1)])
def test_compressed_tensors_equals_library_output(tmp_path, bits, dtype, g):
    # (8-bit only in fp32: re-quantizing a bf16 fake weight with |q - z| up to 255 is lossy
    # inside the library's reference path, not in ours; g = -1 is the "channel" strategy)
    model = tiny(dtype)
    qr = quantize_linears(model, bits, g)
    ours = export(model, qr, "compressed-tensors", bits, tmp_path / "ours", g)
    ref_sd, ref_cfg = library_reference(model, qr, bits, dtype, tmp_path / "ref", g)
    our_sd = load_file(ours / "model.safetensors")
    assert set(our_sd) == set(ref_sd)
    for k, v in our_sd.items():
        assert v.dtype == ref_sd[k].dtype and v.shape == ref_sd[k].shape, k
        assert torch.equal(v, ref_sd[k]), k
    our_cfg = json.loads((ours / "config.json").read_text())["quantization_config"]
    assert our_cfg == ref_cfg["quantization_config"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_compressed_tensors_unpacked_by_library_equals_codes(tmp_path, bits):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(bits)
    w = torch.randn(40, 96)  # 40 rows: zero points do not fill whole words at 3 bits
    q = quantize(w, bits, G)
    out = export_single(q, "compressed-tensors", bits, tmp_path, torch.float32)
    sd = load_file(out / "model.safetensors")
    off = 2 ** (bits - 1)
    codes = unpack_from_int32(sd["lin.weight_packed"], bits, torch.Size([40, 96]))
    zeros = unpack_from_int32(sd["lin.weight_zero_point"], bits, torch.Size([40, 3]), packed_dim=0)
    assert torch.equal(codes.to(torch.int32) + off, q.codes.to(torch.int32))
    assert torch.equal(zeros.to(torch.int32) + off, q.zero.to(torch.int32))
    assert sd["lin.weight_shape"].tolist() == [40, 96]


def export_single(q, fmt, bits, out, dtype):
    w = get_writer(fmt, out / fmt, bits, q.group_size)
    w.add_linear("lin", q, dtype)
    w.close({})
    return out / fmt


@pytest.mark.parametrize("bits,dtype", [(3, torch.float32), (4, torch.float32), (3, torch.bfloat16)])
def test_compressed_tensors_loads_in_transformers_with_fake_quant_logits(tmp_path, bits, dtype):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny(dtype)
    qr = quantize_linears(model, bits)
    out = export(model, qr, "compressed-tensors", bits, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), dtype=dtype,
        attn_implementation="eager",  # as build_model's, so logits can match bit for bit
    ).eval()
    ids = torch.tensor([[257, 72, 101, 108, 108, 111, 32, 119]])
    with torch.no_grad():
        got = loaded(ids).logits
        # the stored-scale dequantization is what loaders see, bit for bit
        want = fake_model(model, qr, lambda q: stored_dequant(q, dtype).to(dtype))(ids).logits
        assert torch.equal(got, want)
        # and it is the fake-quant model (exactly in fp32; up to scale rounding in bf16)
        fake = fake_model(model, qr, lambda q: q.dequant(dtype))(ids).logits
    if dtype == torch.float32:
        assert torch.equal(got, fake)
    else:
        torch.testing.assert_close(got.float(), fake.float(), atol=0.05, rtol=0.05)
    for n, q in qr.items():  # the decompressed weights themselves
        assert torch.equal(loaded.get_submodule(n).weight.data, stored_dequant(q, dtype).to(dtype))


def test_compressed_tensors_linear_left_in_16_bit_is_ignored_by_loaders(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny()
    qr = quantize_linears(model, 4)
    keep = "model.layers.1.self_attn.o_proj"
    del qr[keep]  # passed through as a plain weight
    out = export(model, qr, "compressed-tensors", 4, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["ignore"] == ["lm_head", keep]
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), attn_implementation="eager"
    )
    assert torch.equal(loaded.get_submodule(keep).weight, model.get_submodule(keep).weight)
    n = "model.layers.1.self_attn.q_proj"
    assert torch.equal(loaded.get_submodule(n).weight, qr[n].dequant(torch.float32))


def test_compressed_tensors_in_several_shards_loads(tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from quantlrm.export.compressed_tensors import CompressedTensorsWriter

    model = tiny()
    qr = quantize_linears(model, 3)
    out = tmp_path / "ct"
    w = CompressedTensorsWriter(out, 3, G, max_shard_bytes=40_000)
    for name, t in model.state_dict().items():
        mod = name.removesuffix(".weight")
        w.add_linear(mod, qr[mod], t.dtype) if mod in qr else w.add_tensor(name, t)
    w.close(json.loads(model.config.to_json_string()))
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True), attn_implementation="eager"
    )
    for n, q in qr.items():
        assert torch.equal(loaded.get_submodule(n).weight, q.dequant(torch.float32))


def test_stored_scale_rounding_is_the_only_difference():
    torch.manual_seed(0)
    q = quantize(torch.randn(8, 64), 3, 32)
    assert torch.equal(stored_dequant(q, torch.float32), q.dequant(torch.float32))
    d = stored_dequant(q, torch.bfloat16) - q.dequant(torch.float32)
    bound = (q.codes.float() - q.zero.float().repeat_interleave(32, 1)).abs() * (
        q.scale.to(torch.bfloat16).float() - q.scale
    ).abs().repeat_interleave(32, 1)
    # (the fake path rounds its fp32 product once: allow one fp32 ulp on top)
    assert (d.abs() <= bound + 1e-6 * q.dequant(torch.float32).abs() + 1e-12).all()
    assert (d != 0).any()  # bf16 scales do differ


# ---------------------------------------------------------------------- AWQ --------
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_awq_reference(packed: torch.Tensor) -> torch.Tensor:
    """[rows, out/8] -> [rows, out]: nibble i of word k is output channel 8k + AWQ_ORDER[i]."""
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for r in range(rows):
        for k in range(words):
            word = int(packed[r, k]) & 0xFFFFFFFF
            for i in range(8):
                out[r, 8 * k + AWQ_ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def test_awq_layout_and_library_converter(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    torch.manual_seed(1)
    q = quantize(torch.randn(24, 64) * 0.1, 4, G)
    sd = load_file(export_single(q, "awq", 4, tmp_path, torch.bfloat16) / "model.safetensors")
    assert sd["lin.qweight"].dtype == torch.int32 and sd["lin.qweight"].shape == (64, 3)
    assert sd["lin.qzeros"].shape == (2, 3) and sd["lin.scales"].shape == (2, 24)
    assert sd["lin.scales"].dtype == torch.float16
    codes = unpack_awq_reference(sd["lin.qweight"])  # [in, out]
    zeros = unpack_awq_reference(sd["lin.qzeros"])  # [in/g, out]
    assert torch.equal(codes.t(), q.codes.long()) and torch.equal(zeros.t(), q.zero.long())
    # the weight an AWQ kernel computes: (code - zero) * fp16 scale per group
    deq = (codes - zeros.repeat_interleave(G, 0)).float() * sd["lin.scales"].float().repeat_interleave(G, 0)
    assert torch.equal(deq.t(), stored_dequant(q, torch.float16))
    # compressed-tensors' own AutoAWQ reader recovers the same integers
    conv = AutoAWQConverter(group_size=G).process(dict(sd))
    lib_codes = unpack_from_int32(conv["lin.weight_packed"], 4, torch.Size([24, 64]))
    lib_zeros = unpack_from_int32(conv["lin.weight_zero_point"], 4, torch.Size([24, 2]), packed_dim=0)
    assert torch.equal(lib_codes.long() + 8, q.codes.long())
    assert torch.equal(lib_zeros.long() + 8, q.zero.long())
    assert torch.equal(conv["lin.weight_scale"], q.scale.to(torch.float16))


def test_awq_export_read_by_library_converter_gives_stored_logits(tmp_path):
    """Our AWQ checkpoint -> compressed-tensors' AutoAWQ converter (reads our config too) ->
    transformers: the logits of a model holding (code - zero) * fp16 scale."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = tiny()
    qr = quantize_linears(model, 4)
    out = export(model, qr, "awq", 4, tmp_path / "awq")
    conv = AutoAWQConverter.from_autoawq_config(json.loads((out / "config.json").read_text())["quantization_config"])
    convert_checkpoint(out, tmp_path / "ct", conv, max_workers=1, device="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True), attn_implementation="eager"
    ).eval()
    ids = torch.tensor([[257, 65, 87, 81, 33]])
    # the library dequantizes in the scale dtype (fp16), then casts to the model's fp32
    want = fake_model(model, qr, lambda q: stored_dequant(q, torch.float16).half().float())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, want(ids).logits)


def test_awq_config(tmp_path):
    model = tiny()
    out = export(model, quantize_linears(model, 4), "awq", 4, tmp_path / "awq")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg == {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
                   "version": "gemm", "modules_to_not_convert": None}
    sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" in sd and "model.embed_tokens.weight" in sd  # passed through
    # an index even for one shard, so vLLM skips other *.safetensors (search.safetensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd) and set(index["weight_map"].values()) == {"model.safetensors"}
    assert "model.layers.0.self_attn.q_proj.weight" not in sd


def test_awq_refuses_3_bits_naming_formats_that_can():
    with pytest.raises(QuantLRMError) as e:
        get_writer("awq", "/nonexistent", 3, 128)
    msg = str(e.value)
    assert "awq" in msg and "compressed-tensors" in msg and "gptq" in msg


def test_awq_refuses_output_width_not_multiple_of_8(tmp_path):
    q = quantize(torch.randn(12, 64), 4, G)
    w = get_writer("awq", tmp_path, 4, G)
    with pytest.raises(QuantLRMError, match="multiple of 8"):
        w.add_linear("lin", q, torch.float16)


# --------------------------------------------------------------------- GPTQ --------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq-v1"])
def test_gptq_layout(tmp_path, bits, fmt):
    torch.manual_seed(bits)
    q = quantize(torch.randn(64, 96) * 0.1, bits, G)
    if fmt == "gptq-v1":
        assert int(q.zero.min()) >= 1  # v1 can only hold zero >= 1 (random groups have it)
    out = export_single(q, fmt, bits, tmp_path, torch.bfloat16)
    sd = load_file(out / "model.safetensors")
    assert sd["lin.qweight"].shape == (96 * bits // 32, 64) and sd["lin.qweight"].dtype == torch.int32
    assert sd["lin.qzeros"].shape == (3, 64 * bits // 32) and sd["lin.qzeros"].dtype == torch.int32
    assert sd["lin.scales"].shape == (3, 64) and sd["lin.scales"].dtype == torch.float16
    assert torch.equal(sd["lin.g_idx"], torch.arange(96, dtype=torch.int32) // G)
    codes = unpack_gptq_cols(sd["lin.qweight"], bits)  # [in, out]
    zeros = torch.tensor([bits_reference(r, bits, 64) for r in sd["lin.qzeros"]])  # [in/g, out]
    zeros = zeros + (1 if fmt == "gptq-v1" else 0)  # v1 stores zero - 1
    assert torch.equal(codes.t(), q.codes.long()) and torch.equal(zeros.t(), q.zero.long())
    g_idx = sd["lin.g_idx"].long()
    deq = (codes - zeros[g_idx]).float() * sd["lin.scales"].float()[g_idx]
    assert torch.equal(deq.t(), stored_dequant(q, torch.float16))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "gptq" and cfg["bits"] == bits and cfg["group_size"] == G
    assert cfg["desc_act"] is False and cfg["sym"] is False
    assert cfg["checkpoint_format"] == ("gptq" if fmt == "gptq-v1" else "gptq_v2")
    assert json.loads((out / "quantize_config.json").read_text()) == cfg


def test_gptq_v2_stores_zero_point_0_and_v1_refuses_it(tmp_path):
    w = torch.randn(32, 64) * 0.01
    w[0, :32] = w[0, :32].abs()  # an all-positive group: its zero point is 0
    w[0, 5] = 1.0
    q = quantize(w, 3, G)
    assert int(q.zero[0, 0]) == 0
    sd = load_file(export_single(q, "gptq", 3, tmp_path, torch.float16) / "model.safetensors")
    zeros = torch.tensor([bits_reference(r, 3, 32) for r in sd["lin.qzeros"]])
    assert torch.equal(zeros.t(), q.zero.long())
    wr = get_writer("gptq-v1", tmp_path / "v1", 3, G)
    with pytest.raises(QuantLRMError, match="lin: 1 group.*--format gptq"):
        wr.add_linear("lin", q, torch.float16)


def test_size_report_against_16_bit(tmp_path, capsys):
    model = tiny(torch.bfloat16)
    out = export(model, quantize_linears(model, 3), "gptq", 3, tmp_path / "g")
    line = capsys.readouterr().out
    assert "gptq W3 g32" in line and "at 16 bit" in line
    n16 = sum(t.numel() * 2 for t in model.state_dict().values())
    packed = sum(t.numel() * t.element_size() for t in load_file(out / "model.safetensors").values())
    assert f"({packed / n16:.1%};" in line


def test_mixed_group_sizes_are_refused(tmp_path):
    w = get_writer("gptq", tmp_path, 4, 64)
    w.add_linear("a", quantize(torch.randn(8, 64), 4, 64), torch.float32)
    with pytest.raises(QuantLRMError, match="group size"):
        w.add_linear("b", quantize(torch.randn(8, 128), 4, 128), torch.float32)


def test_per_channel_gptq_and_awq_refusal(tmp_path):
    model = tiny()
    out = export(model, quantize_linears(model, 4, -1), "gptq", 4, tmp_path / "g", -1)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == -1
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.mlp.down_proj.scales"].shape == (1, 64)
    assert not sd["model.layers.0.mlp.down_proj.g_idx"].any()
    w = get_writer("awq", tmp_path / "a", 4, -1)
    with pytest.raises(QuantLRMError, match="group size"):
        w.add_linear("lin", quantize(torch.randn(8, 64), 4, -1), torch.float16)
