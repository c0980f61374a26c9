"""Newer ComfyUI's seams on the tree in COMFYUI_DIR: dynamic-VRAM Linears (emulated from newest
``comfy/ops.py``), CoreModelPatcher and its reload factory, rotary positions through ``post_input``,
TorchCompileModel. The checks run in a subprocess (comfy_newer_seams.py) in ComfyUI's folder."""

from __future__ import annotations


import pytest
import torch
from comfy_server import COMFYUI_DIR, run_in_comfyui, same_on_every_tree

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]


@pytest.fixture(scope="module")
def seams(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("seams")
    result = run_in_comfyui("comfy_newer_seams.py", out, TAGMOE_TINY=str(tiny_bundle.tagmoe))
    result["other_trees"] = same_on_every_tree("one model call", torch.load(out / "model_call.pt"))
    return result


def test_one_model_call_is_the_same_on_every_tree(seams):
    assert all(diff < 1e-5 for diff in seams["other_trees"].values()), seams["other_trees"]


def test_dynamic_vram_linears_load_as_a_normal_load(seams):
    assert seams["lazy_linears"] > 0 and seams["lazy_weights_none_before_load"] == seams["lazy_linears"]
    assert seams["lazy_state_dict_keys_before_load"] < seams["normal_state_dict_keys"]  # what the old check saw
    for name in ("lazy", "lazy_dynamic"):
        assert seams[f"{name}_keys_equal"], name
        assert seams[f"{name}_weights_max_diff"] == 0.0 and seams[f"{name}_call_max_diff"] == 0.0, name
        assert seams[f"{name}_patcher_size"] == seams["normal_weight_bytes"] == seams["normal_patcher_size"], name


def test_the_patcher_is_comfyuis_core_patcher_with_a_reload_factory(seams):
    assert seams["lazy_patcher_class"] == "NewestModelPatcher"
    assert seams["lazy_dynamic_patcher_class"] == "EmulatedCorePatcher"
    assert seams["lazy_dynamic_reload"][0] == "reload_patcher"
    assert seams["lazy_dynamic_reload"][1][1:] == ["default", "LazyOps"]  # the same weight dtype and operations
    assert seams["reload_non_dynamic_class"] == "ModelPatcher" and seams["reload_call_max_diff"] == 0.0
    # ComfyUI-MultiGPU's copy for another device (the fork's model configs refuse deepcopy, dense ones too)
    assert seams["deepcopy_call_max_diff"] == 0.0 or "cannot be deep-copied" in seams["deepcopy_call_max_diff"]


def test_bad_files_get_one_line_errors_with_lazy_linears(seams):
    bad = seams["bad_files"]
    assert bad["missing"].startswith("MissingKeysError") and "experts.1.w2" in bad["missing"], bad
    assert bad["shape"].startswith("ShapeMismatchError") and "proj_out.weight" in bad["shape"], bad
    assert all("\n" not in message for message in bad.values())
    assert seams["interrupted_load"] == "InterruptProcessingException"  # a cancel stops loading


def test_rotary_positions_through_post_input_compose(seams):
    assert seams["post_input_registered"]
    assert seams["ids_differ_from_comfyuis"]  # odd grid: the reference centres it the other way
    assert seams["post_input_ids_equal_fallback"]
    assert seams["embedder_keeps_later_patch"]  # a later pack's ids are not overridden
    assert len(seams["other_method_logs"]) == 1 and seams["other_method_changes_output"] > 0
    # through a newer ComfyUI's post_input loop (emulated): the same outputs as the embedder path
    assert seams["post_input_loop_max_diff"] == {"one": 0.0, "batch of 2": 0.0, "2x3 grid": 0.0, "region": 0.0}
    assert seams["later_patch_moves_tagmoe_ids"]


def test_a_patcher_without_the_hooks_says_so(seams):
    assert len(seams["no_hooks_logs"]) == 1 and seams["no_hooks_changes_output"] > 0
    assert seams["hooks_installed_max_diff"] == 0.0


def test_torch_compile_model_matches_eager(seams):
    compiled = seams["compile"]
    if "skipped" in compiled:
        pytest.skip(compiled["skipped"])
    # a region at two places (same shapes, other positions): each matches its own eager output
    assert len(compiled["per_case"]) == 3 and seams["region_positions_change_output"] > 1e-3, compiled
    assert compiled["max_diff"] < 1e-4 and compiled["again_max_diff"] < 1e-4, compiled
