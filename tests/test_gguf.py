"""TAG-MoE as GGUF: the torch dequantization (bit-exact against gguf-py), ``tagmoe convert ... OUT.gguf``, the
reader's refusals, and the core loader reading a .gguf (Q8_0 close to the original, F32/BF16 equal to it)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tagmoe_core.cli import main
from tagmoe_core.errors import CorruptCheckpointError, NotATagMoECheckpointError, UnsupportedQuantizationError
from tagmoe_core.model.expert_checkpoint import LinearExpertsCheckpoint
from tagmoe_core.model.gguf_convert import convert_to_gguf, tensor_type
from tagmoe_core.model.gguf_dequant import TYPES, dequantize
from tagmoe_core.model.gguf_format import ARCH, KEY_CONFIG, KEY_EXPERTS, KEY_MOE_BLOCKS, QUANT_TYPES
from tagmoe_core.model.gguf_reader import GGUFFile
from tagmoe_core.model.loading import load_tagmoe_transformer

def forward(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 64, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x.to(dtype), timestep=torch.tensor([0.5]), encoder_hidden_states=text.to(dtype),
                     img_shapes=[[(1, 3, 4)]], return_dict=False)[0].float()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def source(tiny_bundle) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.fixture(scope="module")
def converted(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    """The tiny model converted once to every type."""
    folder = tmp_path_factory.mktemp("gguf")
    return {q: convert_to_gguf(tiny_bundle.tagmoe, folder / f"tiny-{q}.gguf", q).output for q in QUANT_TYPES}


@pytest.fixture(scope="module")
def original(tiny_bundle):
    model, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base)
    return model


# -- the torch dequantization ----------------------------------------------------------------------------------
K_QUANTS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # where their float16 scales sit in a block


def _raw_k_blocks(name: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """Random K-quant blocks (gguf-py has no K quantizer) with finite, realistic super-block scales."""
    raw = rng.integers(0, 256, (n, TYPES[name].type_size), dtype=np.uint8)
    for at in K_QUANTS[name]:
        raw[:, at:at + 2] = (rng.standard_normal((n, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw


@pytest.mark.parametrize("name", list(TYPES))
def test_dequantization_is_bit_exact_against_gguf_py(name):
    kind = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(int(kind))
    rows = rng.standard_normal((40, 256)).astype(np.float32) * rng.uniform(1e-3, 30, (40, 1)).astype(np.float32)
    rows[3] = 0  # an all-zero block (scale 0)
    rows[4, :32] = 7.25  # a constant block
    rows[5] = np.abs(rows[5])  # all positive / all negative blocks: Q4_1/Q5_1's minimum, Q4_0/Q5_0's sign
    rows[6] = -np.abs(rows[6])
    if name in K_QUANTS:
        raw = _raw_k_blocks(name, rng, 40 * 4).reshape(40, -1)  # rows of 1024 values
        shape = (40, 1024)
    else:
        raw = gguf.quants.quantize(rows, kind)
        shape = (40, 256)
    reference = gguf.quants.dequantize(raw, kind)
    data = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1).view(np.uint8))
    ours = dequantize(data, name, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape and np.isfinite(reference).all()
    assert np.array_equal(ours.numpy().view(np.uint32), reference.view(np.uint32))  # every bit
    as_bf16 = dequantize(data, name, shape, torch.bfloat16)
    assert torch.equal(as_bf16, torch.from_numpy(reference).to(torch.bfloat16))
    if TYPES[name].quantized and name not in K_QUANTS:  # and the data really is compressed, close to what went in
        assert raw.nbytes < rows.nbytes / 3 and rel_l2(ours, torch.from_numpy(rows)) < 0.2


def test_q6_k_quantizer_reads_back_with_gguf_pys_dequantization():
    from tagmoe_core.model.gguf_kquants import quantize_q6_k

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((48, 3072)).astype(np.float32) * rng.uniform(1e-3, 1, (48, 1)).astype(np.float32)
    rows[0] = 0  # all-zero super-blocks
    rows[1, :256] = -0.75  # a constant one
    raw = quantize_q6_k(rows)
    assert raw.shape == (48, 3072 // 256 * 210) and raw.dtype == np.uint8
    kind = gguf.GGMLQuantizationType.Q6_K
    back = gguf.quants.dequantize(raw, kind)
    assert np.array_equal(back[0], rows[0]) and np.allclose(back[1, :256], -0.75, rtol=2e-3)

    def error(kind_name: str) -> float:
        k = gguf.GGMLQuantizationType[kind_name]
        return rel_l2(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, k), k)),
                      torch.from_numpy(rows))

    q6 = rel_l2(torch.from_numpy(back), torch.from_numpy(rows))
    assert error("Q8_0") < q6 < 0.6 * error("Q5_1")  # 6 bits: between Q8_0 and the 5-bit types (measured 0.018)
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), "Q6_K", rows.shape)
    assert np.array_equal(ours.numpy(), back)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_q6_k(rows[:, :100])


@pytest.mark.parametrize("name, coarser", [("Q4_K", ("Q4_0", "Q4_1")), ("Q5_K", ("Q5_0", "Q5_1"))])
def test_q4_k_and_q5_k_quantizers_read_back_with_gguf_pys_dequantization(name, coarser):
    from tagmoe_core.model.gguf_kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

    quantize = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k}[name]
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((48, 3072)).astype(np.float32)
    raw = quantize(rows)
    assert raw.shape == (48, 3072 // 256 * TYPES[name].type_size) and raw.dtype == np.uint8
    kind = gguf.GGMLQuantizationType[name]
    back = gguf.quants.dequantize(raw, kind)
    ours = dequantize(torch.from_numpy(raw.reshape(-1)), name, rows.shape)
    assert np.array_equal(ours.numpy().view(np.uint32), back.view(np.uint32))  # every bit

    def error(kind_name: str) -> float:
        k = gguf.GGMLQuantizationType[kind_name]
        return rel_l2(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(rows, k), k)),
                      torch.from_numpy(rows))

    ours_error = rel_l2(torch.from_numpy(back), torch.from_numpy(rows))  # measured 0.072 (Q4_K), 0.036 (Q5_K)
    assert all(ours_error < error(c) for c in coarser)
    if name == "Q5_K":
        q6 = gguf.quants.dequantize(quantize_q6_k(rows), gguf.quants.GGMLQuantizationType.Q6_K)
        assert rel_l2(torch.from_numpy(q6), torch.from_numpy(rows)) < ours_error
    odd = np.zeros((3, 512), np.float32)  # zero rows, and one huge value among small ones
    odd[1] = rng.standard_normal(512) * 1e-3
    odd[1, 7] = 1e4
    odd[2, 300] = -5.0
    odd_back = gguf.quants.dequantize(quantize(odd), kind)
    assert np.isfinite(odd_back).all() and np.array_equal(odd_back[0], odd[0])
    assert abs(odd_back[1, 7] - 1e4) < 1e2
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(rows[:, :100])


def test_dequantization_checks_its_input():
    with pytest.raises(ValueError, match="Q8_0 data of shape \\[2, 64\\] is 136 bytes, not 100"):
        dequantize(torch.zeros(100, dtype=torch.uint8), "Q8_0", (2, 64))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(136, dtype=torch.int8), "Q8_0", (2, 64))


# -- the converter -----------------------------------------------------------------------------------------------
def test_tensor_types_follow_comfyui_ggufs_qwen_image_files():
    big = (12288, 3072)
    assert tensor_type("transformer_blocks.55.img_mlp.experts.2.w1.weight", big, "Q4_0").name == "Q4_0"
    assert tensor_type("transformer_blocks.55.img_mlp.experts.2.w2.weight", big[::-1], "Q5_1").name == "Q5_1"
    assert tensor_type("transformer_blocks.55.img_mlp.router.weight", (4, 3072), "Q8_0").name == "F32"
    assert tensor_type("router_head.0.weight", (64, 3072), "Q8_0").name == "F32"
    assert tensor_type("transformer_blocks.0.attn.norm_q.weight", (128,), "Q4_0").name == "F32"
    assert tensor_type("transformer_blocks.0.attn.to_q.bias", (3072,), "BF16").name == "F32"
    assert tensor_type("img_in.weight", (3072, 64), "Q4_0").name == "BF16"
    assert tensor_type("proj_out.weight", (64, 3072), "F16").name == "F16"
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (3072, 3072), "BF16").name == "BF16"
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (40, 48), "Q8_0").name == "BF16"  # 48 % 32
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (3072, 3072), "Q6_K").name == "Q6_K"
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (128, 96), "Q6_K").name == "Q8_0"  # 96 % 256
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (3072, 3072), "Q4_K").name == "Q4_K"
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (128, 96), "Q5_K").name == "Q8_0"
    assert tensor_type("transformer_blocks.0.attn.to_q.weight", (32, 32), "Q8_0").name == "F32"  # small


def test_convert_writes_comfyui_keys_one_linear_per_expert(converted, tiny_bundle, source):
    path = converted["Q8_0"]
    reference = gguf.GGUFReader(path)  # the llama.cpp project's own reader
    assert reference.get_field("general.architecture").contents() == ARCH
    assert reference.get_field(KEY_EXPERTS).contents() == 4
    assert reference.get_field(KEY_MOE_BLOCKS).contents() == [2, 3]
    config = json.loads(reference.get_field(KEY_CONFIG).contents())
    assert config["axes_dims_rope"] == [4, 6, 6] and config["num_layers"] == 4
    names = {t.name for t in reference.tensors}
    native = LinearExpertsCheckpoint.open(tiny_bundle.tagmoe)
    assert names == set(native.shapes()) | set(native.tag_keys)  # the native loader's keys, nothing else
    assert "transformer_blocks.3.img_mlp.experts.3.w2.weight" in names
    assert not any("experts.mlp" in n or "experts.bias" in n or "router.layer" in n for n in names)
    types = {t.name: t.tensor_type.name for t in reference.tensors}
    assert types["transformer_blocks.2.img_mlp.experts.0.w1.weight"] == "Q8_0"
    assert types["transformer_blocks.2.img_mlp.router.weight"] == "F32"
    assert types["img_in.weight"] == "BF16" and types["transformer_blocks.0.attn.norm_q.weight"] == "F32"
    # our reader gives gguf-py's values, in the row-major shape; they are the source's within Q8_0's error
    ours = GGUFFile.open(path)
    w1 = source["transformer_blocks.2.img_mlp.experts.mlp.w1"]
    w2 = source["transformer_blocks.2.img_mlp.experts.mlp.w2"]
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert mine.qtype.name == t.tensor_type.name and mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.to_torch().float().numpy().reshape(-1),
                              gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1))
    expert1_w2 = ours.tensors["transformer_blocks.2.img_mlp.experts.1.w2.weight"]
    assert expert1_w2.shape == (32, 128) and expert1_w2.nbytes == 32 * 128 // 32 * 34
    assert rel_l2(expert1_w2.to_torch(), w2[128:256].T) < 0.01
    assert rel_l2(ours.tensors["transformer_blocks.2.img_mlp.experts.3.w1.weight"].to_torch(), w1[384:]) < 0.01


def test_convert_cli_progress_and_sizes(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert main(["convert", str(tiny_bundle.tagmoe), str(out), "--quant", "q4_0"]) == 0
    printed = capsys.readouterr().out
    assert "Q4_0" in printed and "GGML types:" in printed and "F32 x" in printed
    assert out.is_file() and not (tmp_path / "tiny.gguf.part").exists()
    assert GGUFFile.open(out).type_counts()["Q4_0"] == 36  # 2 MoE blocks x 4 experts x 2, and 20 dense matrices
    assert main(["convert", "--tiny", str(tmp_path / "trained.gguf"), "--quant", "q8_0"]) == 0  # the trained model
    assert GGUFFile.open(tmp_path / "trained.gguf").type_counts()["Q8_0"] > 36  # wider: more matrices quantized
    assert main(["convert", "--tiny", str(out), "--quant", "Q4_0"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--tiny", str(tmp_path / "x.safetensors"), "--quant", "Q8_0"]) == 2
    assert "--quant writes a .gguf" in capsys.readouterr().err
    assert main(["convert", "--tiny", str(tmp_path / "x.gguf"), "--dtype", "bf16"]) == 2
    assert "a .gguf takes --quant" in capsys.readouterr().err


def test_convert_reports_progress_and_planned_size(tiny_bundle, tmp_path):
    calls = []
    report = convert_to_gguf(tiny_bundle.tagmoe, tmp_path / "t.gguf", "Q5_0", progress=lambda *a: calls.append(a))
    assert calls[-1][0] == calls[-1][1] == report.tensors and calls[-1][2] <= calls[-1][3]
    assert [c[0] for c in calls] == list(range(1, report.tensors + 1))
    assert report.nbytes == (tmp_path / "t.gguf").stat().st_size  # the planned size was exact (checked inside too)


def test_convert_refuses_a_dense_source(tiny_bundle, tmp_path):
    with pytest.raises(NotATagMoECheckpointError, match="dense Qwen-Image"):
        convert_to_gguf(tiny_bundle.base, tmp_path / "dense.gguf", "Q8_0")
    assert not list(tmp_path.iterdir())


# -- the core loader reads .gguf ---------------------------------------------------------------------------------
def test_f32_and_bf16_ggufs_equal_the_original(converted, original, tiny_bundle):
    f32, report = load_tagmoe_transformer(converted["F32"], tiny_bundle.base)
    assert "base transformer weights: not needed" in report.summary()
    state = original.state_dict()
    for key, value in f32.state_dict().items():
        if not key.endswith("experts.bias"):  # not kept in the per-expert layout (never added)
            assert torch.equal(value, state[key]), key
    assert torch.equal(forward(f32), forward(original))
    before = converted["F32"].read_bytes()
    with torch.no_grad():  # its weights are views of the file's map, copy-on-write: writable, the file untouched
        f32.transformer_blocks[0].attn.to_q.weight.add_(1.0)
    assert converted["F32"].read_bytes() == before
    bf16, _ = load_tagmoe_transformer(converted["BF16"], tiny_bundle.base, dtype=torch.bfloat16)
    reference, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base, dtype=torch.bfloat16)
    assert torch.equal(forward(bf16, torch.bfloat16), forward(reference, torch.bfloat16))


@pytest.mark.parametrize("quant, bound", [("Q8_0", 0.01), ("Q5_K", 0.05), ("Q4_K", 0.08), ("Q4_0", 0.08)])
def test_quantized_gguf_model_call_is_close_to_the_original(quant, bound, converted, original):
    model, _ = load_tagmoe_transformer(converted[quant])  # no base: the config travels in the file
    assert rel_l2(forward(model), forward(original)) < bound


def test_native_checkpoint_view_of_a_gguf(converted, tiny_bundle):
    gguf_view = LinearExpertsCheckpoint.open(converted["Q8_0"])
    release = LinearExpertsCheckpoint.open(tiny_bundle.tagmoe)
    assert gguf_view.shapes() == release.shapes() and gguf_view.blocks == release.blocks == [2, 3]
    gguf_view.check(release.shapes())
    assert gguf_view.nbytes < release.nbytes  # quantized bytes, not dequantized ones
    values = {k: v for chunk, _ in gguf_view.chunks() for k, v in chunk.items()}
    reference = {k: v for chunk, _ in release.chunks() for k, v in chunk.items()}
    assert set(values) == set(reference)
    assert rel_l2(values["transformer_blocks.3.img_mlp.experts.2.w2.weight"],
                  reference["transformer_blocks.3.img_mlp.experts.2.w2.weight"]) < 0.01


# -- bad files: one clear line, before anything is loaded ------------------------------------------------------
def _write(path: Path, arch: str | None, tensors: dict[str, np.ndarray],
           raw: dict[str, gguf.GGMLQuantizationType] = {}, strings: dict[str, str] = {}):
    """A GGUF file of ``tensors`` (``raw``: those already quantized, by type); ``arch`` None: unlabelled."""
    writer = gguf.GGUFWriter(path, arch or "unlabelled")
    if arch is None:
        for fields in writer.kv_data:
            fields.pop("general.architecture", None)
    for key, text in strings.items():
        writer.add_string(key, text)
    for name, data in tensors.items():
        writer.add_tensor(name, data, raw_dtype=raw.get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_dense_qwen_image_gguf_is_refused(tiny_bundle, tmp_path):
    dense = load_file(next((tiny_bundle.base / "transformer").glob("*.safetensors")))
    path = _write(tmp_path / "qwen-image-Q8_0.gguf", "qwen_image",
                  {k: v.float().numpy() for k, v in list(dense.items())[:6]})
    for load in (lambda: load_tagmoe_transformer(path, tiny_bundle.base), lambda: LinearExpertsCheckpoint.open(path)):
        with pytest.raises(NotATagMoECheckpointError, match="dense Qwen-Image GGUF .*'qwen_image'.*tagmoe convert"):
            load()


def test_another_models_gguf_is_refused(tmp_path):
    path = _write(tmp_path / "llama.gguf", "llama", {"token_embd.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(NotATagMoECheckpointError, match="general.architecture 'llama', not TAG-MoE"):
        load_tagmoe_transformer(path)


def test_an_unsupported_quant_type_is_refused(tmp_path):
    raw = np.zeros((4, 84), np.uint8)  # one Q2_K block per row: 4 rows of 256 values
    path = _write(tmp_path / "k.gguf", ARCH, {"transformer_blocks.0.attn.to_q.weight": raw},
                  {"transformer_blocks.0.attn.to_q.weight": gguf.GGMLQuantizationType.Q2_K})
    with pytest.raises(UnsupportedQuantizationError, match=r"Q2_K \(1 tensors.*reads F32, F16, BF16.*Q6_K"):
        GGUFFile.open(path)


def test_a_type_id_gguf_py_does_not_know_is_named_not_called_truncated(tmp_path):
    """gguf-py stops reading at a tensor type id it has no name for (a quantization newer than the
    installed package); that was reported as a truncated file."""
    import struct

    name = "transformer_blocks.0.attn.to_q.weight"
    data = bytearray(_write(tmp_path / "known.gguf", ARCH, {name: np.zeros((4, 32), np.float32)}).read_bytes())
    at = data.index(name.encode()) + len(name)  # then: n_dims (u32), dims (u64 each), type (u32)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 99)
    (tmp_path / "type-99.gguf").write_bytes(data)
    with pytest.raises(UnsupportedQuantizationError, match=r"GGML type 99, which the installed gguf package does "
                                                          r"not know; this loader reads F32, .*tagmoe convert"):
        GGUFFile.open(tmp_path / "type-99.gguf")


def test_truncated_and_foreign_files_are_refused(converted, tmp_path):
    whole = converted["Q8_0"].read_bytes()
    for size, match in ((len(whole) - 100, "not a readable GGUF file: truncated"), (64, "not a readable GGUF file"),
                        (0, "not a readable GGUF|not a GGUF")):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(whole[:size])
        with pytest.raises(CorruptCheckpointError, match=match):
            load_tagmoe_transformer(cut)
    foreign = tmp_path / "renamed.gguf"
    foreign.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(64))  # a safetensors file
    with pytest.raises(CorruptCheckpointError, match="is not a GGUF file"):
        load_tagmoe_transformer(foreign)


def test_cli_edit_reads_a_gguf(converted, tiny_bundle, photo, tmp_path):
    photo.save(tmp_path / "in.png")

    def edit(weights: Path, name: str) -> np.ndarray:
        assert main(["edit", "--pretrained_model_path", str(tiny_bundle.base), "--transformer_model_path",
                     str(weights), "--device", "cpu", "--image", str(tmp_path / "in.png"), "--prompt",
                     "Change the cloak to red color", "--width", "64", "--height", "32", "--steps", "2", "--seed", "3",
                     "--output", str(tmp_path / name)]) == 0
        return np.asarray(Image.open(tmp_path / name), dtype=np.float32)

    reference = edit(tiny_bundle.tagmoe, "ref.png")
    assert np.array_equal(edit(converted["F32"], "f32.png"), reference)
    q8 = edit(converted["Q8_0"], "q8.png")
    assert np.abs(q8 - reference).mean() < 2.0  # of 255


def test_orig_shape_metadata_gives_the_logical_shape(tmp_path):
    from tagmoe_core.model.gguf_format import ORIG_SHAPE, stored_shape

    assert stored_shape((2, 3, 4, 5, 64)) == (6, 4, 5, 64) and stored_shape((3, 64)) == (3, 64)
    data = np.arange(6 * 4 * 5 * 64, dtype=np.float32).reshape(6, 4, 5, 64)
    writer = gguf.GGUFWriter(tmp_path / "five.gguf", ARCH)
    writer.add_array(ORIG_SHAPE + "x.weight", [2, 3, 4, 5, 64])  # as ComfyUI-GGUF's converter writes it
    writer.add_tensor("x.weight", data)
    writer.add_tensor("transformer_blocks.0.img_mlp.router.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = GGUFFile.open(tmp_path / "five.gguf").tensors["x.weight"]
    assert tensor.shape == (2, 3, 4, 5, 64)
    assert torch.equal(tensor.to_torch().reshape(-1), torch.from_numpy(data).reshape(-1))


@pytest.mark.slow
def test_gguf_conversion_holds_about_one_source_tensor_not_the_model(tmp_path):
    """A ~200 MiB TAG-MoE in the release layout (experts stacked): the memory in use at every written tensor
    stays near one source tensor and its quantized copy, far below the model; the experts come out split."""
    import gc

    from safetensors.torch import save_file
    from test_convert import _can_measure, _live_bytes, with_config

    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer

    if not _can_measure():
        pytest.skip("reads resident memory from /proc, with glibc's malloc_trim")
    config = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 4, "attention_head_dim": 64,
              "num_attention_heads": 8, "joint_attention_dim": 64, "guidance_embeds": False,
              "axes_dims_rope": [8, 28, 28]}
    meta = build_tagmoe_transformer(config, MoESpec(num_experts=4, num_moe_blocks=2))  # shapes only
    state = {}
    for key, value in meta.state_dict(keep_vars=True).items():
        tensor = torch.full(tuple(value.shape), 0.01)
        if key.endswith(("experts.mlp.w1", "experts.mlp.w2")):
            tensor = torch.arange(4).repeat_interleave(value.shape[0] // 4)[:, None].float().add(1).expand(value.shape)
        state[key] = tensor.contiguous()
    folder = with_config(tmp_path / "big", config)
    save_file(state, folder / "big.safetensors")
    total = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    del state, meta
    gc.collect()
    peak, baseline = 0, _live_bytes()

    def sample(*_):
        nonlocal peak
        peak = max(peak, _live_bytes() - baseline)

    report = convert_to_gguf(folder, tmp_path / "big.gguf", "Q8_0", progress=sample)
    print(f"peak {peak / 2**20:.0f} MiB converting a {total / 2**20:.0f} MiB model (largest tensor "
          f"{largest / 2**20:.0f} MiB) to {report.nbytes / 2**20:.0f} MiB of Q8_0")
    assert total > 128 * 2**20 and report.nbytes < total / 3
    assert peak < total / 4 and peak < 4 * largest, \
        f"resident memory grew by {peak / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"
    tensors = GGUFFile.open(tmp_path / "big.gguf").tensors
    for e in range(4):
        w1 = tensors[f"transformer_blocks.3.img_mlp.experts.{e}.w1.weight"]
        w2 = tensors[f"transformer_blocks.3.img_mlp.experts.{e}.w2.weight"]
        assert w1.qtype.name == "Q8_0" and w1.shape == (2048, 512) and w2.shape == (512, 2048)
        assert torch.allclose(w1.to_torch(), torch.full((2048, 512), e + 1.0), rtol=1e-3)
        assert torch.allclose(w2.to_torch(), torch.full((512, 2048), e + 1.0), rtol=1e-3)


@pytest.mark.parametrize("name", list(K_QUANTS))
def test_k_quant_tensors_written_by_other_tools_are_read(name, tmp_path):
    raw = _raw_k_blocks(name, np.random.default_rng(1), 8).reshape(4, -1)  # 4 rows of 512 values
    kind = gguf.GGMLQuantizationType[name]
    path = _write(tmp_path / "k.gguf", ARCH, {"transformer_blocks.0.attn.to_q.weight": raw,
                                              "transformer_blocks.0.img_mlp.router.weight": np.ones((4, 8),
                                                                                                    np.float32)},
                  {"transformer_blocks.0.attn.to_q.weight": kind})
    tensor = GGUFFile.open(path).tensors["transformer_blocks.0.attn.to_q.weight"]
    assert tensor.qtype.name == name and tensor.shape == (4, 512) and tensor.nbytes == raw.nbytes
    assert np.array_equal(tensor.to_torch().numpy(), gguf.quants.dequantize(raw, kind))


def test_a_gguf_converts_back_to_safetensors_and_to_another_type(converted, source, tmp_path):
    from safetensors.torch import load_file as load_safetensors

    from tagmoe_core.model.convert import convert_checkpoint

    report = convert_checkpoint(converted["F32"], tmp_path / "back.safetensors", "fp32")
    assert report.merged_experts and len(report.zero_filled) == 2  # experts.bias is not kept in a GGUF
    back = load_safetensors(tmp_path / "back.safetensors")
    assert set(back) == set(source)
    for key, value in source.items():
        assert key.endswith("experts.bias") or torch.equal(back[key], value.float()), key
    again = convert_to_gguf(converted["F32"], tmp_path / "again-Q8_0.gguf", "Q8_0").output
    direct = GGUFFile.open(converted["Q8_0"]).tensors
    for name, tensor in GGUFFile.open(again).tensors.items():  # F32 GGUF -> Q8_0 is the source -> Q8_0
        assert tensor.qtype == direct[name].qtype and torch.equal(tensor.data, direct[name].data), name


# -- a ComfyUI that reads .gguf itself (the hiddenswitch fork's comfy.gguf) -------------------------------------
def _relabelled(source: Path, path: Path, arch: str | None) -> Path:
    """``source``'s tensors (quantized ones as they are) under another ``general.architecture``."""
    reader = gguf.GGUFReader(source, "r")
    return _write(path, arch, {t.name: np.asarray(t.data) for t in reader.tensors},
                  {t.name: t.tensor_type for t in reader.tensors})


def test_tagmoe_architecture_reads_the_header(converted, tiny_bundle, tmp_path):
    from tagmoe_core.model.gguf_reader import tagmoe_architecture

    assert tagmoe_architecture(converted["Q8_0"]) == ARCH
    # labelled as dense Qwen-Image (as a converter that labels files by their keys would) but holding routers
    assert tagmoe_architecture(_relabelled(converted["Q8_0"], tmp_path / "moe-as-qwen.gguf", "qwen_image")) \
        == "qwen_image"
    dense = load_file(next((tiny_bundle.base / "transformer").glob("*.safetensors")))
    qwen = _write(tmp_path / "qwen-image.gguf", "qwen_image",
                  {k: v.float().numpy() for k, v in list(dense.items())[:2]})
    assert tagmoe_architecture(qwen) is None
    unlabelled = _relabelled(converted["Q8_0"], tmp_path / "moe-unlabelled.gguf", None)
    assert tagmoe_architecture(unlabelled) == "no general.architecture"
    assert tagmoe_architecture(_write(tmp_path / "dense-unlabelled.gguf", None,
                                      {k: v.float().numpy() for k, v in list(dense.items())[:2]})) is None
    assert tagmoe_architecture(_write(tmp_path / "llama.gguf", "llama", {"t": np.zeros((2, 32), np.float32)})) is None
    (tmp_path / "not.gguf").write_bytes(b"not a gguf at all")
    assert tagmoe_architecture(tmp_path / "not.gguf") is None and tagmoe_architecture(tmp_path / "missing.gguf") is None
    whole = converted["Q8_0"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:200])
    assert tagmoe_architecture(tmp_path / "cut.gguf") is None


@pytest.mark.parametrize("arch", ["qwen_image", None])
def test_a_tagmoe_file_labelled_otherwise_is_read_as_tagmoe_with_a_warning(converted, tmp_path, caplog, arch):
    """Another converter may label a TAG-MoE file by its keys (qwen_image) or not at all: with MoE routers
    inside, the loader reads it as TAG-MoE (the same tensors) and says so, rather than refusing it as
    another model."""
    path = _relabelled(converted["Q8_0"], tmp_path / f"moe-as-{arch}.gguf", arch)
    with caplog.at_level("WARNING", logger="tagmoe"):
        read = GGUFFile.open(path)
    said = "has no general.architecture" if arch is None else "says general.architecture 'qwen_image'"
    assert f"{said} but holds MoE routers: reading it as TAG-MoE" in caplog.text
    ours = GGUFFile.open(converted["Q8_0"])
    assert set(read.tensors) == set(ours.tensors)
    assert all(torch.equal(read.tensors[k].data, ours.tensors[k].data) for k in ours.tensors)


def test_a_comfyui_gguf_loader_refuses_a_tagmoe_file_and_reads_every_other(converted, tiny_bundle, tmp_path):
    """The pack wraps a running ComfyUI's own ``comfy.gguf.gguf_sd_loader`` (the hiddenswitch fork has one,
    which only warns on an unknown architecture and would build dense Qwen-Image): here a stand-in module,
    since CI has no ComfyUI; test_comfyui_gguf.py runs the real one."""
    import types

    from node_harness import REPO, load_pack

    bridge = load_pack(REPO).nodes.comfy_bridge
    calls = []
    builtin = types.ModuleType("comfy_gguf_standin")

    def original(path, handle_prefix="model.diffusion_model.", **kw):
        calls.append(path)
        return {"k": 1}

    builtin.gguf_sd_loader = original
    dense = load_file(next((tiny_bundle.base / "transformer").glob("*.safetensors")))
    qwen = _write(tmp_path / "qwen-image.gguf", "qwen_image",
                  {k: v.float().numpy() for k, v in list(dense.items())[:2]})
    assert bridge.guard_gguf_loader(builtin) and bridge.guard_gguf_loader(builtin)
    assert builtin.gguf_sd_loader.__wrapped__ is original  # wrapped once, however often called
    with pytest.raises(ValueError, match=r"^'tiny-Q8_0.gguf' is a TAG-MoE .gguf \('tagmoe_qwen_image'\): load it "
                                         r"with TAG-MoE Load Diffusion Model; this loader would drop its MoE experts$"):
        builtin.gguf_sd_loader(str(converted["Q8_0"]))
    # the same file labelled qwen_image, which this loader accepts without a warning: refused too
    relabelled = _relabelled(converted["Q8_0"], tmp_path / "moe-as-qwen.gguf", "qwen_image")
    with pytest.raises(ValueError, match=r"^'moe-as-qwen.gguf' is a TAG-MoE .gguf \('qwen_image'\)"):
        builtin.gguf_sd_loader(str(relabelled))
    assert calls == []  # refused before the loader read anything
    assert builtin.gguf_sd_loader(str(qwen), handle_prefix=None) == {"k": 1} and calls == [str(qwen)]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(12))  # the loader's own error for an unreadable file, not the guard's
    assert builtin.gguf_sd_loader(str(broken)) == {"k": 1} and calls[-1] == str(broken)
    assert not bridge.guard_gguf_loader(types.ModuleType("no_loader"))
    not_callable = types.ModuleType("not_callable")
    not_callable.gguf_sd_loader = "a string"
    assert not bridge.guard_gguf_loader(not_callable) and not_callable.gguf_sd_loader == "a string"


@pytest.mark.parametrize("quant, bound", [("Q6_K", 0.03), ("Q5_K", 0.05), ("Q4_K", 0.08)])
def test_k_quant_files_of_the_trained_tiny_model_load_and_stay_close(quant, bound, tmp_path):
    """The random tiny model has no matrix 256 wide, so its K-quant files are Q8_0 throughout; the trained
    tiny model's 14 matrices of 512 inputs (FFN down projections, experts' w2) take the K-type: written,
    read back through the core loader, one model call within ``bound`` of the original weights (measured
    1.5e-2 / 1.8e-2 / 4.3e-2)."""
    from tagmoe_core.tiny import trained_tiny_bundle

    bundle = trained_tiny_bundle()
    report = convert_to_gguf(bundle.tagmoe, tmp_path / f"trained-{quant}.gguf", quant)
    assert report.type_counts[quant] == 14 and report.type_counts["Q8_0"] == 54
    assert GGUFFile.open(report.output).type_counts()[quant] == 14
    original, _ = load_tagmoe_transformer(bundle.tagmoe)
    quantized, _ = load_tagmoe_transformer(report.output)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 5, 32, generator=g)

    def call(model):
        with torch.no_grad():
            return model(hidden_states=x, timestep=torch.tensor([0.6]), encoder_hidden_states=text,
                         img_shapes=[[(1, 4, 4)]], return_dict=False)[0]

    want = call(original)
    rel = float((call(quantized) - want).norm() / want.norm())
    assert 0 < rel < bound, rel


def _release_layout_gguf(tiny_bundle, path: Path, experts: gguf.GGMLQuantizationType | None) -> Path:
    """The tiny model's weights in the release's layout (stacked experts, ``experts.mlp.w1/w2``) as a
    hand-made GGUF (not what 'tagmoe convert' writes): the stacked experts in ``experts`` (None: F32),
    the rest F32."""
    state = {}
    for f in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(f))
    stacked = {k for k in state if k.endswith(("experts.mlp.w1", "experts.mlp.w2"))} if experts is not None else set()
    assert any(k.endswith("experts.mlp.w1") for k in state)
    tensors = {k: gguf.quants.quantize(v.float().numpy(), experts) if k in stacked else v.float().numpy()
               for k, v in state.items()}
    return _write(path, ARCH, tensors, dict.fromkeys(stacked, experts),
                  {KEY_CONFIG: (tiny_bundle.tagmoe / "transformer" / "config.json").read_text()})


def test_quantized_experts_in_the_release_layout_are_refused_before_loading(tiny_bundle, tmp_path):
    """A hand-made GGUF with the release's stacked expert tensors quantized (not what 'tagmoe convert'
    writes): the native path keeps weights quantized and cannot slice them per expert, so it is refused by
    the check that runs before the model is built, not midway through the file; the core path (weights
    dequantized at load) still reads it."""
    from tagmoe_core.errors import UnknownLayoutError

    path = _release_layout_gguf(tiny_bundle, tmp_path / "release-layout-Q8_0.gguf", gguf.GGMLQuantizationType.Q8_0)
    ckpt = LinearExpertsCheckpoint.open(path)
    try:
        with pytest.raises(UnknownLayoutError, match=r"quantized MoE weights in the release layout .*experts\.mlp"):
            ckpt.check({}, quantized=True)
    finally:
        ckpt.close()
    model, _ = load_tagmoe_transformer(path, tiny_bundle.base)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_float_experts_in_the_release_layout_pass_the_quantized_check(tiny_bundle, tmp_path):
    """The same stacked layout in F32 (nothing quantized): the native path slices it per expert as it
    does a safetensors file, so the pre-load check lets it through (it once took every GGUF tensor for a
    quantized one and refused the file as 'quantized MoE weights')."""
    path = _release_layout_gguf(tiny_bundle, tmp_path / "release-layout-F32.gguf", None)
    ckpt = LinearExpertsCheckpoint.open(path)
    try:
        expected = ckpt.shapes()
        ckpt.check(expected, quantized=True)
        got = {k: v for chunk, _ in ckpt.chunks(quantized=True) for k, v in chunk.items()}
    finally:
        ckpt.close()
    assert set(got) == set(expected) and any(".experts.0." in k for k in got)
    assert all(tuple(got[k].shape) == tuple(expected[k]) for k in got)
