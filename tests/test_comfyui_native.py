"""TAG-MoE as a native ComfyUI MODEL, in a real ComfyUI, against tagmoe_core on the same weights.

The native graphs (TAG-MoE Load Diffusion Model, CONDITIONING from the diffusers text encoder, the
edit conditioning or ComfyUI's own ReferenceLatent, SamplerCustomAdvanced with TAG-MoE Scheduler,
CFG Guider and Noise) must give tagmoe_core's denoised latents within float tolerance (CPU, fp32).
The VAE posterior is taken at its mode in the core, as ComfyUI's VAE Encode does. Checks that need
ComfyUI's Python objects (cast-on-forward, the patcher's size, LoRA patches) run in
``comfy_inprocess.py`` in a subprocess, so that ComfyUI's top-level modules (``nodes``, ``utils``)
do not meet this repository's.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from comfy_server import COMFYUI_DIR, latents_of, run_in_comfyui, run_prompt, same_on_every_tree, write_latent
from PIL import Image

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]

PROMPT = "Change the cloak to red color"
W, H, STEPS, SEED, CFG = 64, 48, 3, 11, 4.0
# Float tolerance for latents of magnitude ~10 after a few steps (measured: see the printed figures).
TOLERANCE = {"reference latent": 1e-4}


@pytest.fixture(scope="module")
def core(comfy_server, tiny_bundle):
    from tagmoe_core.pipeline.builder import load_pipeline

    return load_pipeline(comfy_server["base"], tiny_bundle.tagmoe, device="cpu")


def _inputs(image=None, mask=None):
    text = {"2": {"class_type": "TagMoETextEncodeDiffusers", "inputs": {"base_model": "Qwen-Image", "text": PROMPT}},
            "3": {"class_type": "TagMoETextEncodeDiffusers", "inputs": {"base_model": "Qwen-Image", "text": ""}}}
    return {"1": {"class_type": "TagMoELoadDiffusionModel", "inputs": {"weights": "TAG-MoE/",
                                                                       "weight_dtype": "default"}}, **text}


def _sampling(positive, negative, latent, prefix):
    return {
        "20": {"class_type": "TagMoEScheduler", "inputs": {"steps": STEPS, "denoise": 1.0, "latent": latent}},
        "21": {"class_type": "TagMoECFGGuider", "inputs": {"model": ["1", 0], "positive": positive,
                                                           "negative": negative, "cfg": CFG}},
        "22": {"class_type": "TagMoENoise", "inputs": {"model": ["1", 0], "noise_seed": SEED,
                                                       "draw_on": "reference (model device and dtype)"}},
        "23": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["22", 0], "guider": ["21", 0],
                                                                 "sampler": ["23", 0], "sigmas": ["20", 0],
                                                                 "latent_image": latent}},
        "25": {"class_type": "SaveLatent", "inputs": {"samples": ["24", 0], "filename_prefix": prefix}},
    }


def _native(server, prompt) -> torch.Tensor:
    latents = latents_of(server, run_prompt(server, prompt))
    return latents["25"]


def _report(name: str, native: torch.Tensor, want: torch.Tensor) -> float:
    assert native.shape == want.shape, (native.shape, want.shape)
    diff = float((native.float() - want.float()).abs().max())
    print(f"{name}: max |native - core| = {diff:.3g} (latents up to {float(want.abs().max()):.3g})")
    for tree, tree_diff in same_on_every_tree(name, native).items():  # the same graph on another ComfyUI
        assert tree_diff < TOLERANCE["reference latent"], (name, tree, tree_diff)
    return diff


def _example(server, name="example.png") -> Image.Image:
    return Image.open(server["home"] / "input" / name)


def test_text_to_image_matches_the_core(comfy_server, core):
    prompt = {**_inputs(), "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H,
                                                                                   "batch_size": 1}},
              **_sampling(["2", 0], ["3", 0], ["10", 0], "native_t2i")}
    want = core.sample(core.encode(PROMPT, ""), None, width=W, height=H, steps=STEPS, cfg=CFG, seed=SEED).latents
    native = _native(comfy_server, prompt)
    assert _report("text-to-image", native.reshape(want.shape), want) < TOLERANCE["reference latent"]


def test_edit_with_comfyuis_reference_latent_matches_the_core(comfy_server, core):
    """A plain edit with ComfyUI's own ReferenceLatent node, given the condition latent the core
    encodes: the transformer, MoE, positions, schedule, CFG and noise all match."""
    image = _example(comfy_server)
    condition = core.prepare_condition(image, W, H, posterior="mode")
    from tagmoe_core.pipeline.latents import denormalize, unpack

    write_latent(comfy_server["home"] / "input" / "tagmoe_ref.latent",
                 denormalize(unpack(condition.tokens, H, W), core.vae.config))
    prompt = {**_inputs(),
              "5": {"class_type": "LoadLatent", "inputs": {"latent": "tagmoe_ref.latent"}},
              "6": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["5", 0]}},
              "7": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["5", 0]}},
              "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
              **_sampling(["6", 0], ["7", 0], ["10", 0], "native_refedit")}
    want = core.sample(core.encode(PROMPT, ""), image, width=W, height=H, steps=STEPS, cfg=CFG, seed=SEED,
                       posterior="mode").latents
    native = _native(comfy_server, prompt)
    assert _report("edit, ComfyUI ReferenceLatent", native.reshape(want.shape), want) < TOLERANCE["reference latent"]


def _edit_prompt(image: str, prefix: str, mask: bool) -> dict:
    conditioning = {"positive": ["2", 0], "negative": ["3", 0], "vae": ["5", 0], "image": ["4", 0],
                    "width": W, "height": H}
    if mask:
        conditioning["mask"] = ["4", 1]
    return {**_inputs(),
            "4": {"class_type": "LoadImage", "inputs": {"image": image}},
            "5": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
            "6": {"class_type": "TagMoEEditConditioning", "inputs": conditioning},
            **_sampling(["6", 0], ["6", 1], ["6", 2], prefix)}


def test_edit_conditioning_with_comfyuis_vae_matches_the_core(comfy_server, core):
    want = core.sample(core.encode(PROMPT, ""), _example(comfy_server), width=W, height=H, steps=STEPS, cfg=CFG,
                       seed=SEED, posterior="mode").latents
    native = _native(comfy_server, _edit_prompt("example.png", "native_edit", mask=False))
    assert _report("edit, TAG-MoE Edit Conditioning + ComfyUI VAE", native, want) < TOLERANCE["reference latent"]


def test_region_edit_matches_the_core(comfy_server, core):
    from tagmoe_core.pipeline.regions import mask_box, region_from_pixel_box

    rgba = _example(comfy_server, "region_example.png")
    # LoadImage splits the alpha off as the MASK (here: the painted region) and gives the RGB pixels
    mask = 1.0 - torch.from_numpy(np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0)
    image = rgba.convert("RGB")
    region = region_from_pixel_box(mask_box(mask, image.size), image.size, (W, H))
    want = core.sample(core.encode(PROMPT, ""), image, width=W, height=H, steps=STEPS, cfg=CFG, seed=SEED,
                       region=region, posterior="mode").latents
    native = _native(comfy_server, _edit_prompt("region_example.png", "native_region", mask=True))
    diff = _report(f"region edit {region}", native, want)
    assert diff < TOLERANCE["reference latent"]
    whole = core.sample(core.encode(PROMPT, ""), image, width=W, height=H, steps=STEPS, cfg=CFG, seed=SEED,
                        posterior="mode").latents
    assert float((native - whole).abs().max()) > 5 * diff  # the native run really is the region edit


def test_ksampler_with_the_cfg_patch_lands_near_the_core(comfy_server, core):
    """KSampler takes its sigmas from the model's (static) flow shift, not the reference's
    resolution-dependent one with the terminal stretch: close, not equal."""
    prompt = {**_inputs(),
              "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
              "11": {"class_type": "TagMoECFG", "inputs": {"model": ["1", 0]}},
              "12": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": SEED, "steps": STEPS, "cfg": CFG,
                                                          "sampler_name": "euler", "scheduler": "simple",
                                                          "positive": ["2", 0], "negative": ["3", 0],
                                                          "latent_image": ["10", 0], "denoise": 1.0}},
              "25": {"class_type": "SaveLatent", "inputs": {"samples": ["12", 0], "filename_prefix": "native_ks"}}}
    want = core.sample(core.encode(PROMPT, ""), None, width=W, height=H, steps=STEPS, cfg=CFG, seed=SEED).latents
    native = _native(comfy_server, prompt).reshape(want.shape)
    diff = _report("KSampler (euler, simple) + TAG-MoE CFG", native, want)
    relative = float((native - want).norm() / want.norm())
    print(f"KSampler relative L2 distance to the core: {relative:.3%}")
    assert TOLERANCE["reference latent"] < diff and relative < 0.02


def test_comfyui_objects_in_process(tiny_bundle, tmp_path):
    """Cast-on-forward forced on, the patcher's size, LoRA patches and their report, idle experts."""
    result = run_in_comfyui("comfy_inprocess.py", tmp_path, timeout=600, TAGMOE_TINY=str(tiny_bundle.tagmoe))
    assert result["patcher_size"] == result["weight_bytes"]
    assert result["expert_bytes"] > 0 and result["patcher_size"] > result["expert_bytes"]
    assert result["cast_on_forward_max_diff"] == 0.0 and result["lowvram_cast_modules"] > 0
    assert result["lora_changes_output"] > 1e-4
    assert result["lora_with_cast_on_forward_max_diff"] < 1e-6
    assert sorted(result["lora_not_applied"]) == ["transformer.transformer_blocks.2.img_mlp.net.0.proj",
                                                  "transformer.transformer_blocks.2.img_mlp.net.2"]
    assert "blocks [2]" in result["lora_report"] and result["lora_applied"] == 4
    assert result["peft_lora"] == {"applied": 4, "not_applied": result["lora_not_applied"], "same_patches": True}
    assert result["stock_lora_patched_keys"] == result["lora_patched_keys"]
    assert not result["diffusers_imported"]
    # Record Routing: both passes of every step, the conditional pass's layout (the negative had no image)
    assert result["recording"] == {"passes": ["cond", "uncond"], "steps": 3, "records": 3 * 2 * 2,
                                   "target_grid": [3, 4], "condition_grid": [3, 4], "num_target": 12}
    assert result["maps"] == [[4, 3, 4], [4, 3, 4]] and result["maps_two_refs"] == [4, 3, 4]
    assert result["analysis"].startswith("routing signature g")
    assert result["guidance_changes_output"] > 1e-4 and result["guidance_leaves_the_model_alone"] == 0.0
    assert result["weight_dtypes_match"]
    assert result["fp8_dtypes"] == {"router": "torch.bfloat16", "expert": "torch.float8_e4m3fn",
                                    "attention": "torch.float8_e4m3fn"}
    assert 0 < result["fp8_relative_error"] < 0.1
    assert result["idle_expert_calls"] == [0, result["moe_layers"], 0, 0]  # experts 0, 2, 3 never ran nor moved
