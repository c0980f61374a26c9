"""``tagmoe convert``: every layout to one release-layout .safetensors, read back by both loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tagmoe_core.cli import main
from tagmoe_core.errors import CheckpointNotFoundError
from tagmoe_core.model.convert import ConvertError, _check_destination, convert_checkpoint
from tagmoe_core.model.expert_checkpoint import LinearExpertsCheckpoint
from tagmoe_core.model.layout import METADATA_KEY
from tagmoe_core.model.expert_layout import split_experts
from tagmoe_core.model.loading import load_tagmoe_transformer

COMFY_PREFIX = "model.diffusion_model."
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def source(tiny_bundle) -> dict[str, torch.Tensor]:
    """The tiny release checkpoint (3 safetensors shards behind an index), all in memory, for comparing."""
    state = {}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.fixture(scope="module")
def tiny_config(tiny_bundle) -> dict:
    return json.loads((tiny_bundle.tagmoe / "transformer" / "config.json").read_text())


def read_back(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


def forward(model, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 64, generator=g)
    text = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x.to(dtype), timestep=torch.tensor([0.5]), encoder_hidden_states=text.to(dtype),
                     img_shapes=[[(1, 3, 4)]], return_dict=False)[0].float()


def with_config(folder: Path, tiny_config: dict) -> Path:
    """The tiny model has 16-dim heads: a lone file needs its config.json beside it (the release's 128 do not)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_config))
    return folder


# -- the release layout, sharded --------------------------------------------------------------------------------
def test_sharded_release_checkpoint_to_one_bf16_file(tiny_bundle, source, tiny_config, tmp_path):
    out = tmp_path / "tagmoe_bf16.safetensors"
    report = convert_checkpoint(tiny_bundle.tagmoe, out, "bf16")
    tensors, metadata = read_back(out)
    assert set(tensors) == set(source)
    for key, value in source.items():
        assert tensors[key].dtype == torch.bfloat16 and torch.equal(tensors[key], value.to(torch.bfloat16)), key
    config = json.loads(metadata[METADATA_KEY])
    assert metadata["format"] == "pt"
    assert {k: config[k] for k in tiny_config if not k.startswith("_")} == {
        k: v for k, v in tiny_config.items() if not k.startswith("_")}
    assert report.tensors == len(source) and report.nbytes == out.stat().st_size
    assert not report.merged_experts and not report.zero_filled and report.clamped == 0
    assert report.source_nbytes == sum(v.numel() * v.element_size() for v in source.values())
    assert not list(tmp_path.glob("*.part"))


def test_fp32_file_loads_in_the_core_loader_and_runs_exactly_like_the_original(tiny_bundle, tmp_path):
    out = tmp_path / "tagmoe_fp32.safetensors"
    convert_checkpoint(tiny_bundle.tagmoe, out, "fp32")
    original, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base)
    converted, report = load_tagmoe_transformer(out, tiny_bundle.base)
    assert report.keys_from_base == 0 and not report.missing_optional
    assert torch.equal(forward(converted), forward(original))


def test_the_core_loader_reads_the_config_a_converted_file_carries(tiny_bundle, tmp_path):
    """A single converted file in a models folder has no config.json beside it: the one in its
    header is enough for the core loader too (before: 'no Qwen-Image transformer config found')."""
    alone = tmp_path / "models"
    alone.mkdir()
    out = alone / "tagmoe.safetensors"
    convert_checkpoint(tiny_bundle.tagmoe, out, "fp32")
    model, _ = load_tagmoe_transformer(out)
    original, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base)
    assert model.config.axes_dims_rope == original.config.axes_dims_rope
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_bf16_file_runs_like_the_original_in_bf16(tiny_bundle, tmp_path):
    out = tmp_path / "tagmoe_bf16.safetensors"
    convert_checkpoint(tiny_bundle.tagmoe, out, "bf16")
    # Loaded in bf16, the original's weights are cast exactly as convert cast them: the same numbers.
    original, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base, dtype=torch.bfloat16)
    converted, _ = load_tagmoe_transformer(out, tiny_bundle.base, dtype=torch.bfloat16)
    assert torch.equal(forward(converted, torch.bfloat16), forward(original, torch.bfloat16))
    # Loaded in fp32, the bf16 file is the fp32 original up to bf16 rounding of the weights.
    full, _ = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base)
    rounded, _ = load_tagmoe_transformer(out, tiny_bundle.base)
    want, got = forward(full), forward(rounded)
    assert not torch.equal(got, want)  # the weights did change
    assert (got - want).norm() / want.norm() < 2e-2


def test_native_loader_reads_the_file_and_its_config(tiny_bundle, source, tmp_path):
    out = tmp_path / "diffusion_models" / "tagmoe.safetensors"
    convert_checkpoint(tiny_bundle.tagmoe, out, "bf16")
    native = LinearExpertsCheckpoint.open(out)
    reference = LinearExpertsCheckpoint.open(tiny_bundle.tagmoe)
    assert native.dims == reference.dims and native.dims["axes_dims_rope"] == (4, 6, 6)
    assert native.blocks == reference.blocks and native.spec == reference.spec
    assert native.shapes() == reference.shapes() and native.has_tag_modules
    loaded = {k: v for chunk, _ in native.chunks() for k, v in chunk.items()}
    expected = {k: v for chunk, _ in reference.chunks() for k, v in chunk.items()}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value.to(torch.bfloat16)), key
    native.close()
    reference.close()
    # Without the header's config, a lone file of this (16-dim head) model could not be opened.
    bare = tmp_path / "bare" / "tagmoe.safetensors"
    bare.parent.mkdir()
    save_file(load_file(out), bare)
    with pytest.raises(CheckpointNotFoundError, match="axes_dims_rope"):
        LinearExpertsCheckpoint.open(bare)


# -- other layouts --------------------------------------------------------------------------------------------------
def test_per_expert_layout_comfyui_saves_goes_back_to_the_release_layout(tiny_bundle, source, tiny_config, tmp_path):
    per_expert = split_experts({k: v for k, v in source.items() if not k.startswith(("tag_", "router_head"))}, 4)
    assert any(".experts.3.w2.weight" in k for k in per_expert) and not any("experts.bias" in k for k in per_expert)
    folder = with_config(tmp_path / "comfy", tiny_config)
    save_file({COMFY_PREFIX + k: v.contiguous() for k, v in per_expert.items()}, folder / "tagmoe_comfy.safetensors")
    out = tmp_path / "release.safetensors"
    report = convert_checkpoint(folder / "tagmoe_comfy.safetensors", out, "fp32")
    tensors, _ = read_back(out)
    biases = sorted(k for k in source if k.endswith("experts.bias"))
    assert report.merged_experts and sorted(report.zero_filled) == biases
    assert set(tensors) == {k for k in source if not k.startswith(("tag_", "router_head"))}
    for key, value in tensors.items():
        want = torch.zeros_like(source[key]) if key in biases else source[key]
        assert torch.equal(value, want), key
    model, load = load_tagmoe_transformer(out, tiny_bundle.base)
    assert load.missing_optional and load.keys_from_base == 0


def test_per_expert_layout_streams_with_small_chunks(tiny_bundle, source, tiny_config, tmp_path):
    # Row blocks smaller than one expert: merged tensors come out of many pieces, still exact.
    folder = with_config(tmp_path / "comfy", tiny_config)
    save_file({k: v.contiguous() for k, v in split_experts(source, 4).items()}, folder / "w.safetensors")
    out = tmp_path / "release.safetensors"
    convert_checkpoint(folder, out, "bf16", chunk_bytes=100)
    tensors, _ = read_back(out)
    for key, value in source.items():
        want = torch.zeros(value.shape, dtype=torch.bfloat16) if key.endswith("experts.bias") else value.to(
            torch.bfloat16)
        assert torch.equal(tensors[key], want), key


@pytest.mark.parametrize("wrapper", [None, "state_dict"])
def test_pickled_bin_source(tiny_bundle, source, tiny_config, wrapper, tmp_path):
    folder = with_config(tmp_path / "bin", tiny_config)
    torch.save(source if wrapper is None else {wrapper: source, "step": 7}, folder / "tagmoe.bin")
    out = tmp_path / "from_bin.safetensors"
    convert_checkpoint(folder / "tagmoe.bin", out, "fp16")
    tensors, _ = read_back(out)
    assert set(tensors) == set(source)
    assert all(torch.equal(tensors[k], v.to(torch.float16)) for k, v in source.items())


def test_fp8_matrices_vectors_in_bf16_and_clamping(tiny_bundle, source, tiny_config, tmp_path):
    state = {k: v.clone() for k, v in source.items()}
    w1 = "transformer_blocks.2.img_mlp.experts.mlp.w1"
    state[w1][0, :3] = torch.tensor([1000.0, -3000.0, 448.0])
    state["transformer_blocks.0.attn.to_q.weight"][1, 1] = float("inf")
    state["transformer_blocks.0.attn.to_q.bias"][0] = 6144.0  # a vector: bf16, not clamped
    folder = with_config(tmp_path / "big", tiny_config)
    save_file(state, folder / "tagmoe.safetensors")
    out = tmp_path / "tagmoe_fp8.safetensors"
    report = convert_checkpoint(folder, out, "fp8_e4m3fn")
    tensors, _ = read_back(out)

    def goes_to_fp8(key: str) -> bool:
        return state[key].ndim >= 2 and not key.startswith(("tag_", "router_head")) and ".router." not in key

    fp8_keys = [k for k in state if goes_to_fp8(k)]
    assert fp8_keys and report.fp8_tensors == len(fp8_keys)
    assert report.clamped == sum(int((state[k].abs() > 448).sum()) for k in fp8_keys) == 3
    for key, value in state.items():
        if goes_to_fp8(key):
            assert tensors[key].dtype == FP8, key
            assert torch.equal(tensors[key].float(), value.clamp(-448, 448).to(FP8).float()), key
        else:
            assert tensors[key].dtype == torch.bfloat16 and torch.equal(tensors[key], value.to(torch.bfloat16)), key
    assert tensors[w1][0, :3].tolist() == [448.0, -448.0, 448.0]
    assert tensors["transformer_blocks.0.attn.to_q.bias"][0].item() == 6144.0
    bf16 = tmp_path / "tagmoe_bf16.safetensors"
    convert_checkpoint(folder, bf16, "bf16")
    assert out.stat().st_size < 0.8 * bf16.stat().st_size
    model, _ = load_tagmoe_transformer(out, tiny_bundle.base, dtype=torch.bfloat16)
    assert torch.isfinite(forward(model, torch.bfloat16)).all()


def test_a_converted_file_converts_again_from_its_own_header(tiny_bundle, source, tmp_path):
    first = tmp_path / "a" / "first.safetensors"  # no config.json beside it: the header's config is used
    convert_checkpoint(tiny_bundle.tagmoe, first, "fp32")
    second = tmp_path / "second.safetensors"
    convert_checkpoint(first, second, "bf16")
    assert read_back(second)[1] == read_back(first)[1]
    assert all(torch.equal(v, source[k].to(torch.bfloat16)) for k, v in read_back(second)[0].items())


# -- streaming --------------------------------------------------------------------------------------------------------
def _live_bytes() -> int:
    """Resident memory after glibc has handed back what it keeps of freed blocks (it otherwise holds on
    to freed blocks of this test's 16 MiB size, which would read as memory the conversion still uses)."""
    import ctypes
    import os

    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _can_measure() -> bool:
    import ctypes

    return Path("/proc/self/statm").exists() and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _can_measure(), reason="reads resident memory from /proc, with glibc's malloc_trim")
def test_conversion_holds_about_one_source_tensor_not_the_model(tiny_config, tmp_path):
    """A ~200 MiB TAG-MoE (inner dim 512, experts of the dense FFN's size, per-expert layout): the
    memory in use at every written block stays near one source tensor, far below the model."""
    import gc

    from tagmoe_core.model.expert_layout import to_linear_experts
    from tagmoe_core.model.moe import MoESpec
    from tagmoe_core.model.transformer import build_tagmoe_transformer

    config = {**tiny_config, "attention_head_dim": 64, "num_attention_heads": 8, "joint_attention_dim": 64,
              "axes_dims_rope": [8, 28, 28]}
    spec = MoESpec(num_experts=4, num_moe_blocks=2)
    meta = build_tagmoe_transformer(config, spec)  # shapes only
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict(keep_vars=True).items()}
    plan = to_linear_experts(shapes, spec.num_experts)
    state = {}
    for key, piece in plan.items():
        expert = key.split(".experts.")[1].split(".")[0] if ".experts." in key else None
        value = float(int(expert) + 1) * (-1 if key.endswith("w2.weight") else 1) if expert else 0.01
        state[key] = torch.full(piece.shape(shapes[piece.source]), value)
    ffn = 4 * 512
    folder = with_config(tmp_path / "big", config)
    save_file(state, folder / "big.safetensors")
    total = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    del state, meta
    gc.collect()

    peak = 0
    baseline = _live_bytes()

    def sample(*_):
        nonlocal peak
        peak = max(peak, _live_bytes() - baseline)

    out = tmp_path / "big_release.safetensors"
    report = convert_checkpoint(folder, out, "bf16", progress=sample)
    assert total > 128 * 2**20 and report.nbytes > total // 3
    assert peak < total / 4 and peak < 8 * largest, \
        f"resident memory grew by {peak / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"
    with safe_open(str(out), framework="pt") as handle:
        w1 = handle.get_slice("transformer_blocks.3.img_mlp.experts.mlp.w1")
        assert [w1[e * ffn:e * ffn + 1, :1].item() for e in range(4)] == [1.0, 2.0, 3.0, 4.0]
        w2 = handle.get_slice("transformer_blocks.2.img_mlp.experts.mlp.w2")
        assert w2.get_shape() == [4 * ffn, 512] and w2[3 * ffn:3 * ffn + 2, :].float().unique().tolist() == [-4.0]


# -- failures ---------------------------------------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_cli_converts_and_refuses_an_existing_output_without_overwrite(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "tagmoe.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(tiny_bundle.tagmoe), str(out)]) == 2
    assert "already exists" in one_line_error(capsys) and out.read_bytes() == b"keep me"
    assert main(["convert", str(tiny_bundle.tagmoe), str(out), "--overwrite", "--dtype", "fp8_e4m3fn"]) == 0
    assert "float8" in capsys.readouterr().out
    assert read_back(out)[0]["transformer_blocks.0.attn.to_q.weight"].dtype == FP8
    assert not list(tmp_path.glob("*.part"))


def test_cli_tiny(tiny_bundle, source, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", "--tiny", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert set(read_back(out)[0]) == set(source)
    assert main(["convert", "--tiny", str(tiny_bundle.tagmoe), str(out)]) == 2
    assert "only OUT" in one_line_error(capsys)


def test_dense_qwen_image_source_is_refused(tiny_bundle, tmp_path, capsys):
    out = tmp_path / "dense.safetensors"
    assert main(["convert", str(tiny_bundle.base / "transformer"), str(out)]) == 2
    assert "dense Qwen-Image" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tiny_bundle, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    assert main(["convert", str(tiny_bundle.tagmoe), str(blocker / "tagmoe.safetensors")]) == 2
    assert "cannot write to" in one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_too_little_disk_space_is_refused_before_writing(tmp_path):
    out = tmp_path / "tagmoe.safetensors"
    with pytest.raises(ConvertError, match="GiB free, the converted file needs"):
        _check_destination(out, out.with_name(out.name + ".part"), 1 << 60)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(tiny_bundle, tmp_path):
    out = tmp_path / "tagmoe.safetensors"

    def interrupt(tensors: int, total: int, done: int, size: int) -> None:
        if tensors == 5:
            assert (tmp_path / "tagmoe.safetensors.part").is_file()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_bundle.tagmoe, out, "bf16", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case, message", [
    ("suffix", "must be a .safetensors file"),
    ("itself", "is the source itself"),
    ("dtype", "dtype must be one of"),
    ("partial", "holds MoE layers but not the rest"),
    ("incomplete", "lacks 1 weight"),
])
def test_other_refusals(tiny_bundle, source, tiny_config, tmp_path, case, message):
    src, out, dtype = tiny_bundle.tagmoe, tmp_path / "out.safetensors", "bf16"
    if case == "suffix":
        out = tmp_path / "out.ckpt"
    elif case == "itself":
        src = with_config(tmp_path / "src", tiny_config) / "tagmoe.safetensors"
        save_file(source, src)
        out = src
    elif case == "dtype":
        dtype = "int8"
    elif case == "incomplete":
        src = with_config(tmp_path / "no_norm", tiny_config) / "t.safetensors"
        save_file({k: v for k, v in source.items() if k != "norm_out.linear.weight"}, src)
    else:
        src = with_config(tmp_path / "moe_only", tiny_config) / "moe.safetensors"
        save_file({k: v for k, v in source.items() if ".img_mlp." in k}, src)
    with pytest.raises(ConvertError, match=message):
        convert_checkpoint(src, out, dtype, overwrite=case == "itself")
    assert not out.with_name(out.name + ".part").exists()
    if case != "itself":
        assert not out.exists()


def test_fp16_saturates_and_counts_instead_of_overflowing(tiny_bundle, source, tiny_config, tmp_path):
    state = {k: v.clone() for k, v in source.items()}
    state["img_in.weight"][0, 0] = 1e5
    state["img_in.bias"][0] = -1e6  # vectors too: fp16 is the chosen type for everything
    folder = with_config(tmp_path / "src", tiny_config)
    save_file(state, folder / "tagmoe.safetensors")
    report = convert_checkpoint(folder, tmp_path / "fp16.safetensors", "fp16")
    tensors, _ = read_back(tmp_path / "fp16.safetensors")
    assert report.clamped == 2 and "2 value(s) clamped to the fp16 range" in report.summary()
    assert tensors["img_in.weight"][0, 0].item() == 65504.0 and tensors["img_in.bias"][0].item() == -65504.0
    assert all(torch.isfinite(v).all() for v in tensors.values())
