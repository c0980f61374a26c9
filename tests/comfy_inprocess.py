"""Checks on ComfyUI's own objects, run by test_comfyui_native.py in a subprocess with ComfyUI's folder
as the working directory (so ``import nodes`` is ComfyUI's). Writes its measurements to
``$TAGMOE_OUT/result.json``; the test asserts on them.

* the ModelPatcher's size is the bytes of every weight, the experts included;
* ComfyUI's cast-on-forward (what low-VRAM loading switches on for weights that do not fit) gives
  the same output as the fully loaded model, LoRA patches included (then applied per forward);
* a LoRA's attention and expert keys apply; its keys for the dense FFN of the MoE blocks are
  reported by name; ComfyUI's own loader patches the same keys;
* an expert that gets no token is never called, so under cast-on-forward its weights never move.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.getcwd())  # ComfyUI
sys.path.append(str(HERE))  # node_harness, comfy_server (after ComfyUI: its "nodes" wins)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.model_management  # noqa: E402,F401
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import torch  # noqa: E402
from comfy_server import LORA_NAME, write_test_lora  # noqa: E402
from node_harness import REPO, load_pack  # noqa: E402


def main() -> None:
    out = Path(os.environ["TAGMOE_OUT"])
    pack = load_pack(REPO)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_lora = importlib.import_module(pack.__name__ + ".nodes.comfy_lora")
    run_state = importlib.import_module(pack.__name__ + ".tagmoe_core.model.run_state")
    moe_linear = importlib.import_module(pack.__name__ + ".tagmoe_core.model.moe_linear")
    result: dict = {}

    loaded = comfy_model.load_tagmoe_model(os.environ["TAGMOE_TINY"])
    patcher = loaded.patcher
    diffusion = patcher.model.diffusion_model
    result["patcher_size"] = patcher.model_size()
    result["weight_bytes"] = sum(t.nelement() * t.element_size() for t in patcher.model.state_dict().values())
    result["expert_bytes"] = sum(p.nelement() * p.element_size() for n, p in diffusion.named_parameters()
                                 if ".experts." in n)

    # one model call on fixed inputs
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 6, 8, generator=gen)
    context = torch.randn(1, 7, 32, generator=gen)
    ref = torch.randn(1, 16, 1, 6, 8, generator=gen)
    sigma = torch.tensor([0.7])

    def call(p) -> torch.Tensor:
        with torch.inference_mode():
            return p.model.apply_model(x, sigma, c_crossattn=context, ref_latents=[ref],
                                       transformer_options={}).clone()

    def full(p):
        p.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=0)
        try:
            return call(p)
        finally:
            p.unpatch_model(torch.device("cpu"))

    def lowvram(p):
        p.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # nothing fits: cast every Linear
        try:
            result["lowvram_cast_modules"] = sum(bool(getattr(m, "comfy_cast_weights", False))
                                                 for m in p.model.modules())
            return call(p)
        finally:
            p.unpatch_model(torch.device("cpu"))

    plain = full(patcher)
    result["cast_on_forward_max_diff"] = float((lowvram(patcher) - plain).abs().max())

    lora_path = out / LORA_NAME
    write_test_lora(lora_path)
    with_lora, report = comfy_lora.apply_lora(patcher, str(lora_path), 1.0)
    result["lora_patched_keys"] = sorted(with_lora.patches)
    result["lora_not_applied"] = report.not_applied
    result["lora_applied"] = report.applied
    result["lora_report"] = report.text()
    stock, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(str(lora_path)), 1.0, 0)
    result["stock_lora_patched_keys"] = sorted(stock.patches)
    # The same LoRA as PEFT saves it (Qwen-Image LoRAs: "{module}.lora_A.default.weight"), which ComfyUI loads too
    from safetensors.torch import load_file, save_file

    peft_path = out / "peft_lora.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(str(lora_path)).items()},
              str(peft_path))
    peft, peft_report = comfy_lora.apply_lora(patcher, str(peft_path), 1.0)
    result["peft_lora"] = {"applied": peft_report.applied, "not_applied": peft_report.not_applied,
                           "same_patches": sorted(peft.patches) == sorted(with_lora.patches)}
    lora_full = full(with_lora)
    result["lora_changes_output"] = float((lora_full - plain).abs().max())
    result["lora_with_cast_on_forward_max_diff"] = float((lowvram(with_lora) - lora_full).abs().max())

    experts = [m for m in diffusion.modules() if isinstance(m, moe_linear.LinearExpertsMoE)]
    calls = [0] * experts[0].num_experts
    hooks = [expert.w1.register_forward_hook(lambda m, a, o, e=e: calls.__setitem__(e, calls[e] + 1))
             for layer in experts for e, expert in enumerate(layer.experts)]
    with run_state.routing_run(logit_bias=torch.tensor([0.0, 90.0, 0.0, 0.0])):
        lowvram(patcher)
    for hook in hooks:
        hook.remove()
    result["idle_expert_calls"] = calls
    result["moe_layers"] = len(experts)
    result["diffusers_imported"] = "diffusers" in sys.modules  # the native path must not need it

    fp8_patcher = comfy_model.load_tagmoe_model(os.environ["TAGMOE_TINY"], "fp8_e4m3fn").patcher
    fp8 = fp8_patcher.model.diffusion_model
    moe = next(m for m in fp8.modules() if isinstance(m, moe_linear.LinearExpertsMoE))
    result["fp8_dtypes"] = {"router": str(moe.router.weight.dtype), "expert": str(moe.experts[0].w1.weight.dtype),
                            "attention": str(fp8.transformer_blocks[0].attn.to_q.weight.dtype)}
    fp8_out = full(fp8_patcher)  # fp8 storage, cast to the compute dtype per forward
    result["fp8_relative_error"] = float((fp8_out.float() - plain).norm() / plain.norm())

    # Record Routing and Tag Guidance as per-run patches, sampled by ComfyUI (positive with a reference
    # latent, negative without one: the recorded layout must be the conditional pass's)
    comfy_sampling = importlib.import_module(pack.__name__ + ".nodes.comfy_sampling")
    routing = importlib.import_module(pack.__name__ + ".tagmoe_core.intent.routing")
    taxonomy = importlib.import_module(pack.__name__ + ".tagmoe_core.taxonomy")
    from comfy.samplers import sampler_object

    heads = comfy_model.tag_heads(patcher)
    capture = routing.RoutingCapture(heads)
    recorded = comfy_sampling.with_routing_recorder(patcher, capture)
    tags = taxonomy.TaskTags.from_text("global editing, style transfer, structure preservation")
    latent = torch.zeros(1, 16, 1, 6, 8)
    steps = 3

    def sample(p, refs=(ref,)):
        guider = comfy_sampling.ReferenceCFGGuider(p)
        guider.set_conds([[context, {"reference_latents": list(refs)}]], [[context[:, :3], {}]])
        guider.set_cfg(4.0)
        with torch.inference_mode():
            return guider.sample(x.clone(), latent, sampler_object("euler"),
                                 torch.linspace(1, 0, steps + 1), disable_pbar=True, seed=1)

    base_out = sample(recorded)
    rec = capture.recording
    result["recording"] = {"passes": sorted({r.pass_name for r in rec.records}), "steps": rec.steps,
                           "records": len(rec.records), "target_grid": list(rec.target_grid),
                           "condition_grid": list(rec.condition_grid or []), "num_target": rec.num_target}
    maps_target, maps_condition = rec.expert_maps()
    result["maps"] = [list(maps_target.shape), list(maps_condition.shape) if maps_condition is not None else None]
    sample(recorded, refs=(ref, ref))  # two reference latents: the maps still draw (the first)
    result["maps_two_refs"] = list(capture.recording.expert_maps()[1].shape)
    result["analysis"] = routing.analyse(capture.recording, heads, tags).report().splitlines()[0]
    guided = comfy_sampling.with_tag_guidance(patcher, heads, tags, 3.0)
    result["guidance_changes_output"] = float((sample(guided) - base_out).abs().max())
    result["guidance_leaves_the_model_alone"] = float((sample(patcher) - base_out).abs().max())
    result["weight_dtypes_match"] = list(comfy_model.WEIGHT_DTYPES) == importlib.import_module(
        pack.__name__ + ".nodes.native.loader").WEIGHT_DTYPES

    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
