"""A TAG-MoE ``.gguf`` as a native ComfyUI MODEL, in a real ComfyUI (see comfy_gguf_inprocess.py)."""

from __future__ import annotations


import pytest
from comfy_server import COMFYUI_DIR, TRAINED_GGUF, is_hiddenswitch_fork, prompt_error, run_in_comfyui

from tagmoe_core.model.gguf_convert import convert_to_gguf

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]


def test_gguf_native_model_in_process(tiny_bundle, tmp_path):
    for quant in ("F32", "Q8_0"):
        convert_to_gguf(tiny_bundle.tagmoe, tmp_path / f"tiny-{quant}.gguf", quant)
    result = run_in_comfyui("comfy_gguf_inprocess.py", tmp_path, timeout=600, TAGMOE_TINY=str(tiny_bundle.tagmoe))
    f32, q8 = result["F32"], result["Q8_0"]
    assert f32["quantized_linears"] == 0 and f32["max_diff_vs_original"] < 1e-5
    assert q8["quantized_linears"] == 36 and q8["quantized_dtypes"] == ["torch.uint8"]
    assert q8["expert_types"] == ["Q8_0"] and q8["router_types"] == ["torch.float32"]  # routers kept F32
    assert "GGUF Linears: BF16" not in q8["summary"] and "Q8_0 x36" in q8["summary"]
    assert q8["patcher_size"] == q8["weight_bytes"] < f32["patcher_size"]  # the quantized bytes
    assert q8["rel_vs_original"] < 0.01 and "GGUF" in q8["patcher_class"]
    for row in (f32, q8):
        assert row["cast_on_forward_max_diff"] < 1e-6
        assert row["lora_applied"] == 4 and row["lora_changes_output"] > 1e-4
        assert row["lora_cast_on_forward_max_diff"] < 1e-5
        assert row["unpatched_max_diff"] == 0.0 and row["patches_left"] == 0
    assert f32["lora_rel_vs_original_lora"] < 1e-5 and q8["lora_rel_vs_original_lora"] < 0.01
    # saving (ComfyUI's ModelSave): a quantized GGUF is refused in one line, by every way ComfyUI saves
    refused = q8["saving"]
    assert refused["refused"].startswith("saving a TAG-MoE model loaded from a quantized .gguf is not supported")
    assert "\n" not in refused["refused"] and refused["file_written"] is False
    assert refused["patcher_state_dict"] == refused["return_weight"] == refused["refused"] and refused["nothing_set"]
    assert f32["saving"]["saved"] and f32["saving"]["saved_keys"] > 100  # a float .gguf saves as any model
    assert result["newest_signature"] == {"seen": [{"return_weight": True, "force_cast": True},
                                                   {"return_weight": False, "force_cast": False}],
                                          "returned": "weight"}
    # with newest ComfyUI's dynamic VRAM (emulated), a GGUF loads with the classic patcher, the same model
    assert result["dynamic_vram_patcher"] == {"dynamic": False, "max_diff": 0.0}
    # ComfyUI's own Load Diffusion Model: Comfy-Org's neither lists nor reads .gguf; the hiddenswitch fork reads
    # them itself (comfy.gguf) and would build a dense Qwen-Image without the experts: the pack's guard refuses
    own = result["own_loader"]
    if own["reads_gguf"]:
        assert own["lists_gguf"] and own["guarded"] and own["load"] == (
            "ValueError: 'tiny-Q8_0.gguf' is a TAG-MoE .gguf ('tagmoe_qwen_image'): load it with TAG-MoE Load "
            "Diffusion Model; this loader would drop its MoE experts"), own
        assert own["relabelled_load"] == (  # labelled qwen_image by another converter, routers inside: refused too
            "ValueError: 'moe-as-qwen.gguf' is a TAG-MoE .gguf ('qwen_image'): load it with TAG-MoE Load "
            "Diffusion Model; this loader would drop its MoE experts")
        assert own["other_reads"] == ["img_in.weight"]  # other files still go to ComfyUI's reader
    else:
        assert not own["lists_gguf"] and "load" not in own
    if "comfyui_gguf" in result:  # city96/ComfyUI-GGUF's UnetLoaderGGUF refuses the file instead of losing experts
        assert result["comfyui_gguf"] == "ValueError: Unexpected architecture type in GGUF file: 'tagmoe_qwen_image'"
        # a TAG-MoE file labelled qwen_image (not what 'tagmoe convert' writes) it reads, experts and all: the README
        # says so (convert with 'tagmoe convert'); the pack does not patch another pack's loader
        relabelled = result["comfyui_gguf_relabelled"]
        print(f"ComfyUI-GGUF's reader on a TAG-MoE file labelled qwen_image: {relabelled}")
        assert isinstance(relabelled, dict) and relabelled["read"] > 0 and relabelled["experts"] > 0, relabelled


def test_comfyuis_own_load_diffusion_model_refuses_a_tagmoe_gguf_where_it_lists_one(comfy_server):
    """ComfyUI's own Load Diffusion Model (UNETLoader) in the running server: Comfy-Org's does not list
    .gguf files; the hiddenswitch fork's lists them and reads them itself, and would build a dense
    Qwen-Image without the experts from a TAG-MoE one: the pack's guard makes that one line instead."""
    import requests

    listed = requests.get(f"{comfy_server['url']}/object_info/UNETLoader", timeout=30).json()["UNETLoader"]
    names = listed["input"]["required"]["unet_name"][0]
    print(f"UNETLoader lists {len(names)} files, .gguf among them: {[n for n in names if n.endswith('.gguf')]}")
    if not is_hiddenswitch_fork():
        assert not [n for n in names if n.endswith(".gguf")]
        return
    assert TRAINED_GGUF in names
    error = prompt_error(comfy_server, {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TRAINED_GGUF, "weight_dtype": "default"}},
        "2": {"class_type": "ModelSave", "inputs": {"model": ["1", 0], "filename_prefix": "never_written"}}})
    print(f"UNETLoader on {TRAINED_GGUF}: {error}")
    assert error == (
        f"'{TRAINED_GGUF}' is a TAG-MoE .gguf ('tagmoe_qwen_image'): load it with TAG-MoE Load Diffusion Model; "
        "this loader would drop its MoE experts")
    assert not list((comfy_server["home"] / "output").rglob("never_written*"))
