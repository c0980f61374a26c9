"""Checkpoint layouts, the meta-device loader and every error a user can act on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tagmoe_core.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    InconsistentExpertsError,
    MissingKeysError,
    NotATagMoECheckpointError,
    ShapeMismatchError,
    UnexpectedKeysError,
    UnknownLayoutError,
)
from tagmoe_core.model.loading import load_tagmoe_transformer
from tagmoe_core.model.moe import TagMoEFeedForward


def shard_files(folder: Path) -> list[Path]:
    return sorted((folder / "transformer").glob("*.safetensors"))


@pytest.fixture(scope="module")
def tagmoe_state(tiny_bundle) -> dict[str, torch.Tensor]:
    state = {}
    for f in shard_files(tiny_bundle.tagmoe):
        state.update(load_file(f))
    return state


@pytest.fixture(scope="module")
def base_state(tiny_bundle) -> dict[str, torch.Tensor]:
    return load_file(tiny_bundle.base / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key


def test_sharded_release_folder(tiny_bundle, tagmoe_state):
    model, report = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base)
    assert_loaded(model, tagmoe_state)
    assert report.moe_blocks == [2, 3] and report.spec.num_experts == 4 and report.spec.top_k == 1
    assert report.keys_from_base == 0 and report.keys_from_tagmoe == len(tagmoe_state)
    assert sum(isinstance(m, TagMoEFeedForward) for m in model.modules()) == 2
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("layout", ["file", "folder", "folder/transformer", "index-file", "bin-index"])
def test_every_safetensors_and_index_layout(layout, tiny_bundle, tagmoe_state, tmp_path):
    if layout == "file":
        target = tmp_path / "tagmoe.safetensors"
        save_file(tagmoe_state, target)
    elif layout == "folder":
        target = tmp_path / "weights"
        target.mkdir()
        save_file(tagmoe_state, target / "diffusion_pytorch_model.safetensors")
    elif layout == "folder/transformer":
        target = tmp_path / "repo"
        shutil.copytree(tiny_bundle.tagmoe, target)
    elif layout == "index-file":
        target = tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json"
        shutil.copytree(tiny_bundle.tagmoe / "transformer", target.parent)
    else:
        target = tmp_path / "bins"
        target.mkdir()
        keys = sorted(tagmoe_state)
        halves = {"pytorch_model-1.bin": keys[: len(keys) // 2], "pytorch_model-2.bin": keys[len(keys) // 2:]}
        weight_map = {}
        for name, part in halves.items():
            torch.save({k: tagmoe_state[k] for k in part}, target / name)
            weight_map.update({k: name for k in part})
        (target / "diffusion_pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_tagmoe_transformer(target, tiny_bundle.base)
    assert_loaded(model, tagmoe_state)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict", "transformer"])
@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickled_state_dicts(wrapper, suffix, tiny_bundle, tagmoe_state, tmp_path):
    path = tmp_path / f"tagmoe{suffix}"
    torch.save(tagmoe_state if wrapper is None else {wrapper: tagmoe_state, "step": 1000}, path)
    model, _ = load_tagmoe_transformer(path, tiny_bundle.base)
    assert_loaded(model, tagmoe_state)


def test_pickles_with_python_objects_are_refused(tiny_bundle, tagmoe_state, tmp_path):
    import argparse

    path = tmp_path / "unsafe.pt"  # e.g. a training checkpoint that pickled its argparse options
    torch.save({"model": tagmoe_state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(CorruptCheckpointError, match="weights_only"):
        load_tagmoe_transformer(path, tiny_bundle.base)


def test_complete_checkpoint_never_reads_base_weights(tiny_bundle, tagmoe_state, tmp_path):
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    shutil.copy(tiny_bundle.base / "transformer" / "config.json", base / "transformer")
    (base / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    model, report = load_tagmoe_transformer(tiny_bundle.tagmoe, base)
    assert_loaded(model, tagmoe_state)
    assert report.keys_from_base == 0


def test_partial_checkpoint_takes_the_rest_from_base(tiny_bundle, tagmoe_state, base_state, tmp_path):
    changed = {k: v for k, v in tagmoe_state.items() if ".img_mlp." in k or k.startswith(("tag_", "router_head"))}
    path = tmp_path / "moe_only.safetensors"
    save_file(changed, path)
    model, report = load_tagmoe_transformer(path, tiny_bundle.base)
    loaded = model.state_dict()
    for key in tagmoe_state:
        want = changed[key] if key in changed else base_state[key]
        assert torch.equal(loaded[key], want), key
    assert report.keys_from_base == len(tagmoe_state) - len(changed) > 0
    assert "base transformer:" in report.summary()


def test_checkpoint_without_tag_modules_still_loads(tiny_bundle, tagmoe_state, tmp_path):
    path = tmp_path / "no_tags.safetensors"
    save_file({k: v for k, v in tagmoe_state.items() if not k.startswith(("tag_", "router_head"))}, path)
    model, report = load_tagmoe_transformer(path, tiny_bundle.base)
    assert report.missing_optional and not model.tagmoe_has_tag_modules
    assert "routing analysis is unavailable" in report.summary()


def test_wrapper_prefix_is_stripped(tiny_bundle, tagmoe_state, tmp_path):
    path = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in tagmoe_state.items()}, path)
    model, _ = load_tagmoe_transformer(path, tiny_bundle.base)
    assert_loaded(model, tagmoe_state)


def test_dtype_and_top_k(tiny_bundle):
    model, report = load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base, dtype=torch.bfloat16, top_k=2)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert report.spec.top_k == 2 and all(m.top_k == 2 for m in model.modules() if isinstance(m, TagMoEFeedForward))


def test_progress_reports_bytes(tiny_bundle):
    seen = []
    load_tagmoe_transformer(tiny_bundle.tagmoe, tiny_bundle.base, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


# -- errors ---------------------------------------------------------------------------------------------
def test_dense_qwen_image_file_given_as_tagmoe_weights(tiny_bundle):
    with pytest.raises(NotATagMoECheckpointError, match=r"no MoE expert weights found for blocks 0-3"):
        load_tagmoe_transformer(tiny_bundle.base / "transformer", tiny_bundle.base)


def test_dense_file_message_names_release_blocks(tmp_path):
    config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": 60}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"transformer_blocks.59.img_mlp.net.2.weight": torch.zeros(2, 2)}, tmp_path / "dense.safetensors")
    with pytest.raises(NotATagMoECheckpointError, match="blocks 50-59"):
        load_tagmoe_transformer(tmp_path / "dense.safetensors")


def test_shape_mismatch_names_key_expected_and_found(tiny_bundle, tagmoe_state, tmp_path):
    bad = dict(tagmoe_state)
    bad["img_in.weight"] = torch.zeros(7, 64)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ShapeMismatchError) as info:
        load_tagmoe_transformer(tmp_path / "bad.safetensors", tiny_bundle.base)
    assert info.value.key == "img_in.weight" and info.value.expected == (32, 64) and info.value.found == (7, 64)
    assert "[32, 64]" in str(info.value) and "[7, 64]" in str(info.value)


def test_missing_keys_are_listed(tiny_bundle, tagmoe_state, tmp_path):
    partial = {k: v for k, v in tagmoe_state.items() if k != "proj_out.weight" and "img_in" not in k}
    save_file(partial, tmp_path / "partial.safetensors")
    shutil.copy(tiny_bundle.base / "transformer" / "config.json", tmp_path / "config.json")
    with pytest.raises(MissingKeysError) as info:
        load_tagmoe_transformer(tmp_path / "partial.safetensors")  # no base to fill them in
    assert set(info.value.keys) == {"proj_out.weight", "img_in.weight", "img_in.bias"}
    assert "proj_out.weight" in str(info.value) and "no base model" in str(info.value)


def test_unexpected_keys_are_listed_or_ignored(tiny_bundle, tagmoe_state, tmp_path):
    extra = dict(tagmoe_state, **{"ema.shadow.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(UnexpectedKeysError, match="ema.shadow.weight") as info:
        load_tagmoe_transformer(tmp_path / "extra.safetensors", tiny_bundle.base)
    assert "--ignore-unexpected-keys" in str(info.value) and "strict=False" not in str(info.value)
    model, report = load_tagmoe_transformer(tmp_path / "extra.safetensors", tiny_bundle.base, strict=False)
    assert report.ignored_keys == ["ema.shadow.weight"]


def test_missing_file_and_folder(tiny_bundle, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_tagmoe_transformer(tmp_path / "nope.safetensors", tiny_bundle.base)
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointNotFoundError, match="missing file"):
        load_tagmoe_transformer(tmp_path, tiny_bundle.base)


def test_corrupt_files(tiny_bundle, tagmoe_state, tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(tagmoe_state, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="incomplete"):
        load_tagmoe_transformer(truncated, tiny_bundle.base)
    broken_index = tmp_path / "idx" / "diffusion_pytorch_model.safetensors.index.json"
    broken_index.parent.mkdir()
    broken_index.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="cannot be read"):
        load_tagmoe_transformer(broken_index.parent, tiny_bundle.base)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptCheckpointError):
        load_tagmoe_transformer(junk, tiny_bundle.base)


def test_unknown_layouts(tiny_bundle, tagmoe_state, tmp_path):
    notes = tmp_path / "weights.txt"
    notes.write_text("hello")
    with pytest.raises(UnknownLayoutError, match="not a weights file"):
        load_tagmoe_transformer(notes, tiny_bundle.base)
    two = tmp_path / "two"
    two.mkdir()
    save_file({"a": torch.zeros(1)}, two / "a.safetensors")
    save_file({"b": torch.zeros(1)}, two / "b.safetensors")
    with pytest.raises(UnknownLayoutError, match="no \\*.index.json"):
        load_tagmoe_transformer(two, tiny_bundle.base)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UnknownLayoutError, match="no weights found"):
        load_tagmoe_transformer(empty, tiny_bundle.base)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UnknownLayoutError, match="state dict"):
        load_tagmoe_transformer(tmp_path / "list.pt", tiny_bundle.base)


def test_hub_repo_id_offline_is_a_clear_error(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointNotFoundError, match="local Hugging Face cache"):
        load_tagmoe_transformer("YUXU915/TAG-MoE", tiny_bundle.base, local_files_only=True)


def test_more_bad_files(tiny_bundle, tmp_path, monkeypatch):
    empty_index = tmp_path / "e" / "diffusion_pytorch_model.safetensors.index.json"
    empty_index.parent.mkdir()
    empty_index.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CorruptCheckpointError, match="weight_map is empty"):
        load_tagmoe_transformer(empty_index, tiny_bundle.base)
    save_file({"a": torch.zeros(2, dtype=torch.uint16)}, tmp_path / "u16.safetensors")
    with pytest.raises(UnknownLayoutError, match="U16"):
        load_tagmoe_transformer(tmp_path / "u16.safetensors", tiny_bundle.base)
    # a mistyped relative path under an existing local folder is not taken for a hub repo id
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="'models/TAG-MoE' does not exist"):
        load_tagmoe_transformer("models/TAG-MoE", tiny_bundle.base)


# -- issue 10: checks before any weight is read ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_non_float_tensors_are_refused_with_key_and_dtype(dtype, suffix, tiny_bundle, tagmoe_state, tmp_path):
    bad = dict(tagmoe_state, **{"img_in.weight": tagmoe_state["img_in.weight"].to(dtype)})
    path = tmp_path / f"quantized{suffix}"
    save_file(bad, path) if suffix == ".safetensors" else torch.save(bad, path)
    with pytest.raises(UnknownLayoutError, match=rf"'img_in.weight' as {str(dtype).removeprefix('torch.')}") as info:
        load_tagmoe_transformer(path, tiny_bundle.base)
    assert "floating point" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float16])
def test_fp8_and_half_precision_files_load(dtype, tiny_bundle, tagmoe_state, tmp_path):
    path = tmp_path / "converted.safetensors"
    save_file({k: v.to(dtype) for k, v in tagmoe_state.items()}, path)
    model, _ = load_tagmoe_transformer(path, tiny_bundle.base, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = tagmoe_state["img_in.weight"].to(dtype).to(torch.bfloat16)
    assert torch.equal(model.img_in.weight, want)


MOE = "transformer_blocks.{}.img_mlp"


def _without_tag_modules(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # router_head's input width is the expert count: without it nothing else tells the router's rows apart
    return {k: v for k, v in state.items() if not k.startswith(("tag_embedding", "router_head"))}


def _load_damaged(state, tiny_bundle, tmp_path):
    save_file(state, tmp_path / "damaged.safetensors")
    return load_tagmoe_transformer(tmp_path / "damaged.safetensors", tiny_bundle.base)


def test_router_rows_must_match_the_expert_weights(tiny_bundle, tagmoe_state, tmp_path):
    bad = _without_tag_modules(tagmoe_state)
    for block in (2, 3):  # 8 router rows over the weights of 4 experts of FFN size 128 (would be 8 of 64)
        bad[f"{MOE.format(block)}.router.layer.weight"] = torch.zeros(8, 32)
    with pytest.raises(InconsistentExpertsError) as info:
        _load_damaged(bad, tiny_bundle, tmp_path)
    message = str(info.value)
    assert "transformer_blocks.2.img_mlp" in message and "[8, 32]" in message and "[512, 32]" in message
    assert "4 experts" in message and "\n" not in message


def test_a_router_with_no_experts_is_a_clear_error(tiny_bundle, tagmoe_state, tmp_path):
    bad = dict(tagmoe_state, **{f"{MOE.format(2)}.router.layer.weight": torch.zeros(0, 32)})
    with pytest.raises(InconsistentExpertsError, match=r"transformer_blocks\.2\.img_mlp.*\[0, 32\].*no experts"):
        _load_damaged(bad, tiny_bundle, tmp_path)


def test_w1_and_w2_must_agree(tiny_bundle, tagmoe_state, tmp_path):
    bad = dict(tagmoe_state, **{f"{MOE.format(3)}.experts.mlp.w2": torch.zeros(256, 32)})
    with pytest.raises(InconsistentExpertsError, match=r"transformer_blocks\.3\.img_mlp.*w1 is \[512, 32\].*w2 is "
                                                      r"\[256, 32\]"):
        _load_damaged(bad, tiny_bundle, tmp_path)


def test_every_moe_block_has_the_same_experts(tiny_bundle, tagmoe_state, tmp_path):
    bad = _without_tag_modules(tagmoe_state)  # block 3 consistently has 2 experts, block 2 has 4
    bad[f"{MOE.format(3)}.router.layer.weight"] = torch.zeros(2, 32)
    for w in ("w1", "w2"):
        bad[f"{MOE.format(3)}.experts.mlp.{w}"] = torch.zeros(256, 32)
    with pytest.raises(InconsistentExpertsError, match=r"block 2 has 4 experts.*block 3 has 2"):
        _load_damaged(bad, tiny_bundle, tmp_path)


@pytest.mark.parametrize("blocks, message", [
    ((2, 3), "blocks 2-3 have expert weights but no router.layer.weight"),
    ((3,), "block 3 has expert weights but no router.layer.weight"),
])
def test_missing_routers_are_named_not_called_dense(blocks, message, tiny_bundle, tagmoe_state, tmp_path):
    bad = {k: v for k, v in tagmoe_state.items() if not any(k == f"{MOE.format(b)}.router.layer.weight"
                                                            for b in blocks)}
    with pytest.raises(InconsistentExpertsError, match=message) as info:
        _load_damaged(bad, tiny_bundle, tmp_path)
    assert "dense" not in str(info.value)


def _linear_reader(state: dict[str, torch.Tensor], path: Path):
    from tagmoe_core.model.checkpoint import CheckpointReader, resolve_weight_files

    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return CheckpointReader.open(resolve_weight_files(path))


def test_per_expert_layout_is_checked_too(tagmoe_state, tmp_path):
    from tagmoe_core.model.expert_layout import split_experts
    from tagmoe_core.model.layout import infer_moe_layout

    linear = split_experts(tagmoe_state, 4)
    spec, blocks = infer_moe_layout(_linear_reader(linear, tmp_path / "good.safetensors"), 4)
    assert blocks == [2, 3] and spec.num_experts == 4 and spec.ffn_hidden_size == 128

    wide_router = dict(linear, **{f"{MOE.format(2)}.router.weight": torch.zeros(8, 32)})
    with pytest.raises(InconsistentExpertsError, match=r"transformer_blocks\.2\.img_mlp.*\[8, 32\].*experts 0-3"):
        infer_moe_layout(_linear_reader(wide_router, tmp_path / "wide.safetensors"), 4)
    no_experts = dict(linear, **{f"{MOE.format(2)}.router.weight": torch.zeros(0, 32)})
    with pytest.raises(InconsistentExpertsError, match="no experts"):
        infer_moe_layout(_linear_reader(no_experts, tmp_path / "zero.safetensors"), 4)
    narrow = dict(linear, **{f"{MOE.format(3)}.experts.1.w1.weight": torch.zeros(64, 32)})
    with pytest.raises(InconsistentExpertsError, match=r"transformer_blocks\.3\.img_mlp\.experts\.1\.w1\.weight.*"
                                                      r"\[64, 32\].*\[128, 32\]"):
        infer_moe_layout(_linear_reader(narrow, tmp_path / "narrow.safetensors"), 4)
    unrouted = {k: v for k, v in linear.items() if not k.endswith("router.weight")}
    with pytest.raises(InconsistentExpertsError, match="blocks 2-3 have expert weights but no router.weight"):
        infer_moe_layout(_linear_reader(unrouted, tmp_path / "unrouted.safetensors"), 4)


def _index_folder(tiny_bundle, folder: Path) -> tuple[Path, dict]:
    shutil.copytree(tiny_bundle.tagmoe / "transformer", folder)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    return index, json.loads(index.read_text())


@pytest.mark.parametrize("value", [7, None, ["a.safetensors"], {"file": "a.safetensors"}])
def test_weight_map_values_must_be_file_names(value, tiny_bundle, tmp_path):
    index, data = _index_folder(tiny_bundle, tmp_path / "t")
    data["weight_map"]["img_in.weight"] = value
    index.write_text(json.dumps(data))
    with pytest.raises(CorruptCheckpointError, match=r"cannot be read: .*'img_in.weight'.* not a file name"):
        load_tagmoe_transformer(index, tiny_bundle.base)


def test_shards_outside_the_index_folder_are_refused(tiny_bundle, tmp_path):
    index, data = _index_folder(tiny_bundle, tmp_path / "t")
    first = sorted(set(data["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(index.parent / first, outside / first)
    for name in (str(outside / first), f"../elsewhere/{first}"):  # absolute, then climbing out
        weight_map = {k: name if v == first else v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CorruptCheckpointError, match="outside the index's folder"):
            load_tagmoe_transformer(index, tiny_bundle.base)
    index.write_text(json.dumps(data))
    (index.parent / first).symlink_to(outside / first)  # a symlink out of the folder
    with pytest.raises(CorruptCheckpointError, match="outside the index's folder"):
        load_tagmoe_transformer(index, tiny_bundle.base)
    (index.parent / first).unlink()
    shutil.move(outside / first, index.parent / f"real-{first}")
    (index.parent / first).symlink_to(f"real-{first}")  # a symlink that stays inside is fine
    load_tagmoe_transformer(index, tiny_bundle.base)


def test_hub_cache_shards_linking_into_blobs_still_load(tiny_bundle, tagmoe_state, tmp_path, monkeypatch):
    """A Hugging Face cache snapshot links each file to ../../blobs/<hash>: that is not an escape."""
    repo = tmp_path / "hub" / "models--YUXU915--TAG-MoE"
    snapshot = repo / "snapshots" / ("0" * 40) / "transformer"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for i, f in enumerate(sorted((tiny_bundle.tagmoe / "transformer").iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..", "..", "..", "blobs", f"blob{i}"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import
    model, _ = load_tagmoe_transformer("YUXU915/TAG-MoE", tiny_bundle.base, local_files_only=True)
    assert_loaded(model, tagmoe_state)


# -- the base model's other components: checked before the transformer is read ----------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_folder(path: Path) -> None:
    for f in path.iterdir():
        f.unlink()


BASE_DAMAGE = [
    ("vae/config.json", lambda p: p.write_text("{not json"), CorruptCheckpointError, "VAE"),
    ("vae/diffusion_pytorch_model.safetensors", _truncate, CorruptCheckpointError, "VAE"),
    ("vae/diffusion_pytorch_model.safetensors", Path.unlink, UnknownLayoutError, "VAE"),
    ("text_encoder/config.json", Path.unlink, CheckpointNotFoundError, "text encoder"),
    ("text_encoder/model.safetensors", lambda p: p.write_bytes(b"\x00" * 64), CorruptCheckpointError, "text encoder"),
    ("tokenizer", _empty_folder, CheckpointNotFoundError, "tokenizer"),
    ("tokenizer/tokenizer.json", _truncate, CorruptCheckpointError, "tokenizer"),
    ("scheduler/scheduler_config.json", lambda p: p.write_text("[1, 2"), CorruptCheckpointError, "scheduler"),
]


class ReachedTheWeights(Exception):
    pass


def _stop_before_reading() -> None:  # load_pipeline's before_load: called just before the first weight is read
    raise ReachedTheWeights  # (past it, a base without text_encoder/config.json builds a default 7B model)


@pytest.mark.parametrize("part, damage, error, component", BASE_DAMAGE,
                         ids=["vae-config-garbage", "vae-weights-truncated", "vae-weights-missing",
                              "text_encoder-config-missing", "text_encoder-weights-garbage", "tokenizer-empty",
                              "tokenizer-json-truncated", "scheduler-config-garbage"])
def test_damaged_base_components_are_named_before_the_transformer_is_read(part, damage, error, component,
                                                                          tiny_bundle, tmp_path):
    from tagmoe_core.pipeline.builder import load_pipeline

    base = tmp_path / "Qwen-Image"
    shutil.copytree(tiny_bundle.base, base)
    damage(base / part)
    with pytest.raises(error) as info:
        load_pipeline(base, tiny_bundle.tagmoe, device="cpu", before_load=_stop_before_reading)
    message = str(info.value)
    assert component in message and str(base / part.split("/")[0]) in message and "\n" not in message


def test_missing_base_folder_is_a_local_error_not_a_download(tiny_bundle, tmp_path, monkeypatch):
    from tagmoe_core.pipeline.builder import load_pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in (tmp_path / "no-such-base", "models/Qwen-Image", "./Qwen-Image"):
        with pytest.raises(CheckpointNotFoundError, match="base model folder .* does not exist") as info:
            load_pipeline(missing, tiny_bundle.tagmoe, device="cpu", before_load=_stop_before_reading)
        assert "internet" not in str(info.value)
