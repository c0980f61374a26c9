"""Checks of a TAG-MoE ``.gguf`` in ComfyUI's own objects, run by test_comfyui_gguf.py in a subprocess with
ComfyUI's folder as the working directory. Writes ``$TAGMOE_OUT/result.json``; the test asserts on it.

* TAG-MoE Load Diffusion Model's loader builds the native model from the GGUF: quantized Linears keep
  their bytes (the patcher's size is the quantized size), and a model call matches the original weights'
  (F32 file: equal; Q8_0: close);
* cast-on-forward (partial loading) gives the fully loaded output; a LoRA changes the output the same
  way as on the original weights, fully loaded (patches kept by the Linear) and cast on forward
  (ComfyUI's weight functions), and unpatching restores the plain output;
* city96/ComfyUI-GGUF's loader (``$COMFYUI_GGUF_DIR``, when given) refuses the file.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.getcwd())  # ComfyUI
sys.path.append(str(HERE))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.model_management  # noqa: E402,F401
import torch  # noqa: E402

if importlib.util.find_spec("comfy_compatibility") is not None:
    # the hiddenswitch fork loads custom nodes in its vanilla environment (a top-level folder_paths, ...);
    # Comfy-Org's ComfyUI has its folder's modules top-level already. A failing import is the fork's setup.
    from comfy_compatibility.vanilla import prepare_vanilla_environment

    prepare_vanilla_environment()
from comfy_server import LORA_NAME, write_test_lora  # noqa: E402
from node_harness import REPO, load_pack  # noqa: E402


def saving(gguf_lora, quant: str, out: Path) -> dict:
    """Saving the model (ComfyUI's ModelSave: ``comfy.sd.save_checkpoint``, which reads
    ``model.state_dict_for_saving``): a quantized GGUF is refused in one line and no file is written (its
    weights are raw GGML bytes); a float one saves, and the file holds the weights. Newest ComfyUI's
    ways in (the patcher's ``model_state_dict_for_saving`` and ``patch_weight_to_device(...,
    return_weight=True)``, both emulated by calling them) are refused the same way."""
    import comfy.sd
    import comfy.utils

    path = out / f"saved-{quant}.safetensors"
    row: dict = {}
    try:
        comfy.sd.save_checkpoint(str(path), gguf_lora)
        row["saved"] = path.is_file()
        saved = comfy.utils.load_torch_file(str(path))
        row["saved_keys"] = sum(k.startswith("model.diffusion_model.") for k in saved)
    except RuntimeError as exc:
        row["refused"], row["file_written"] = str(exc), path.exists()
    key = next((k for k in sorted(gguf_lora.patches)
                if getattr(comfy.utils.get_attr(gguf_lora.model, k.rpartition(".")[0]), "quantized", False)), None)
    if key is not None:
        for name, attempt in (
                ("patcher_state_dict", lambda: gguf_lora.model_state_dict_for_saving(
                    gguf_lora.model.diffusion_model, "diffusion_model.")),
                ("return_weight", lambda: gguf_lora.patch_weight_to_device(
                    key, device_to=torch.device("cpu"), return_weight=True))):
            try:
                attempt()
                row[name] = "returned"
            except RuntimeError as exc:
                row[name] = str(exc)
        row["nothing_set"] = key not in gguf_lora.backup
    comfy.model_management.unload_all_models()  # saving loaded it (with its LoRA) as ComfyUI's current model
    return row


def newest_signature(patcher) -> dict:
    """The GGUF patcher under newest ComfyUI's ``patch_weight_to_device(key, device_to, inplace_update,
    return_weight, force_cast)`` (emulated on the base class): a key it does not keep itself reaches
    ComfyUI's method with the newer arguments; older ComfyUI's method, without them, is called as before."""
    import comfy.model_patcher

    seen = []

    def newest(self, key, device_to=None, inplace_update=False, return_weight=False, force_cast=False):
        seen.append({"return_weight": return_weight, "force_cast": force_cast})
        return "weight" if return_weight else None

    base = comfy.model_patcher.ModelPatcher
    original = base.__dict__["patch_weight_to_device"]
    base.patch_weight_to_device = newest
    try:
        router = next(n for n, m in patcher.model.named_modules() if n.endswith(".router"))
        returned = patcher.patch_weight_to_device(f"{router}.weight", device_to=torch.device("cpu"),
                                                  return_weight=True, force_cast=True)
        patcher.patch_weight_to_device(f"{router}.weight", device_to=torch.device("cpu"))
    finally:
        base.patch_weight_to_device = original
    return {"seen": seen, "returned": returned}


def relabelled(source: Path, path: Path, arch: str = "qwen_image") -> Path:
    """``source``'s tensors (quantized ones as they are) under another ``general.architecture``."""
    import gguf

    if not path.exists():
        reader = gguf.GGUFReader(source, "r")
        writer = gguf.GGUFWriter(path, arch)
        for t in reader.tensors:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def own_loader(out: Path) -> dict:
    """ComfyUI's own Load Diffusion Model (``UNETLoader``: ``comfy.sd.load_diffusion_model``) given the
    TAG-MoE Q8_0 file: whether it lists ``.gguf`` files, whether this ComfyUI reads them itself
    (``comfy.gguf``: the hiddenswitch fork), and what loading the file does: refused in one line by the
    pack's guard, where there is a reader to guard. Another model's ``.gguf`` still reads there."""
    import folder_paths

    import comfy.sd
    import comfy.utils

    listed = out / "listed"  # what Load Diffusion Model's file list shows, from a folder of two empty files
    listed.mkdir(exist_ok=True)
    for name in ("probe.gguf", "probe.safetensors"):
        (listed / name).touch()
    folder_paths.add_model_folder_path("diffusion_models", str(listed))
    names = folder_paths.get_filename_list("diffusion_models")
    assert "probe.safetensors" in names, names
    row: dict = {"lists_gguf": "probe.gguf" in names}
    try:
        import comfy.gguf

        row["reads_gguf"] = True
        row["guarded"] = bool(getattr(comfy.gguf.gguf_sd_loader, "tagmoe_guard", False))
    except ImportError:
        row["reads_gguf"] = False
    if row["lists_gguf"] or row["reads_gguf"]:
        try:
            model = comfy.sd.load_diffusion_model(str(out / "tiny-Q8_0.gguf"))
            built = model.model.diffusion_model
            experts = any(".experts" in n for n, _ in built.named_modules())
            row["load"] = f"loaded {type(built).__name__}, experts: {experts}"
        except Exception as exc:  # noqa: BLE001 - what it raises is the finding
            row["load"] = f"{type(exc).__name__}: {exc}"
        try:  # the same file labelled qwen_image (as a converter labelling by keys would): still TAG-MoE
            comfy.sd.load_diffusion_model(str(relabelled(out / "tiny-Q8_0.gguf", out / "moe-as-qwen.gguf")))
            row["relabelled_load"] = "loaded"
        except Exception as exc:  # noqa: BLE001 - what it raises is the finding
            row["relabelled_load"] = f"{type(exc).__name__}: {exc}"
        import gguf

        other = out / "other-qwen-image.gguf"
        writer = gguf.GGUFWriter(other, "qwen_image")
        writer.add_tensor("model.diffusion_model.img_in.weight", torch.ones(4, 8).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        row["other_reads"] = sorted(comfy.utils.load_torch_file(str(other)))
    return row


def main() -> None:
    out = Path(os.environ["TAGMOE_OUT"])
    pack = load_pack(REPO)
    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    comfy_lora = importlib.import_module(pack.__name__ + ".nodes.comfy_lora")
    comfy_gguf = importlib.import_module(pack.__name__ + ".nodes.comfy_gguf")
    result: dict = {}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 6, 8, generator=gen)
    context = torch.randn(1, 7, 32, generator=gen)
    ref = torch.randn(1, 16, 1, 6, 8, generator=gen)
    sigma = torch.tensor([0.7])

    def call(p, lowvram: bool = False) -> torch.Tensor:
        p.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1 if lowvram else 0)
        try:
            with torch.inference_mode():
                return p.model.apply_model(x, sigma, c_crossattn=context, ref_latents=[ref],
                                           transformer_options={}).clone()
        finally:
            p.unpatch_model(torch.device("cpu"))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    lora_path = out / LORA_NAME
    write_test_lora(lora_path)
    original = comfy_model.load_tagmoe_model(os.environ["TAGMOE_TINY"]).patcher
    plain = call(original)
    lora_original = call(comfy_lora.apply_lora(original, str(lora_path), 1.0)[0])
    result["original_size"] = original.model_size()
    for quant in ("F32", "Q8_0"):
        path = out / f"tiny-{quant}.gguf"
        loaded = comfy_model.load_tagmoe_model(path)
        patcher = loaded.patcher
        diffusion = patcher.model.diffusion_model
        linears = [m for m in diffusion.modules() if isinstance(m, comfy_gguf.GGUFLinear)]
        quantized = [m for m in linears if m.quantized]
        row = {"summary": loaded.summary(), "patcher_class": type(patcher).__name__,
               "patcher_size": patcher.model_size(),
               "weight_bytes": sum(t.nelement() * t.element_size() for t in patcher.model.state_dict().values()),
               "linears": len(linears), "quantized_linears": len(quantized),
               "quantized_dtypes": sorted({str(m.weight.dtype) for m in quantized}),
               "expert_types": sorted({m.ggml_type or str(m.weight.dtype) for n, m in diffusion.named_modules()
                                       if ".experts." in n and isinstance(m, comfy_gguf.GGUFLinear)}),
               "router_types": sorted({m.ggml_type or str(m.weight.dtype) for n, m in diffusion.named_modules()
                                       if n.endswith(".router") and isinstance(m, comfy_gguf.GGUFLinear)})}
        full = call(patcher)
        row["rel_vs_original"] = rel(full, plain)
        row["max_diff_vs_original"] = float((full - plain).abs().max())
        row["cast_on_forward_max_diff"] = float((call(patcher, lowvram=True) - full).abs().max())
        with_lora, report = comfy_lora.apply_lora(patcher, str(lora_path), 1.0)
        row["lora_applied"] = report.applied
        lora_full = call(with_lora)
        row["lora_changes_output"] = float((lora_full - full).abs().max())
        row["lora_rel_vs_original_lora"] = rel(lora_full, lora_original)
        row["lora_cast_on_forward_max_diff"] = float((call(with_lora, lowvram=True) - lora_full).abs().max())
        row["unpatched_max_diff"] = float((call(patcher) - full).abs().max())
        row["patches_left"] = sum(bool(m.gguf_patches) for m in linears)
        row["saving"] = saving(with_lora, quant, out)
        result[quant] = row

    result["newest_signature"] = newest_signature(loaded.patcher)

    # newest ComfyUI with dynamic VRAM on (emulated CoreModelPatcher): a GGUF still gets the classic patcher
    from comfy_newer_seams import EmulatedCorePatcher

    import comfy.model_patcher

    saved = getattr(comfy.model_patcher, "CoreModelPatcher", None)
    comfy.model_patcher.CoreModelPatcher = EmulatedCorePatcher
    try:
        dynamic_on = comfy_model.load_tagmoe_model(out / "tiny-Q8_0.gguf").patcher
    finally:
        if saved is None:
            vars(comfy.model_patcher).pop("CoreModelPatcher", None)
        else:
            comfy.model_patcher.CoreModelPatcher = saved
    q8_classic = loaded.patcher  # the Q8_0 file loaded above, without the emulation
    result["dynamic_vram_patcher"] = {"dynamic": bool(comfy_model.is_dynamic(dynamic_on)),
                                      "max_diff": float((call(dynamic_on) - call(q8_classic)).abs().max())}

    result["own_loader"] = own_loader(out)

    gguf_dir = os.environ.get("COMFYUI_GGUF_DIR")
    if gguf_dir:
        spec = importlib.util.spec_from_file_location("comfyui_gguf_pack", Path(gguf_dir) / "__init__.py",
                                                      submodule_search_locations=[gguf_dir])
        package = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_gguf_pack"] = package  # not executed: its nodes need a running ComfyUI
        loader = importlib.import_module("comfyui_gguf_pack.loader")
        try:
            loader.gguf_sd_loader(str(out / "tiny-Q8_0.gguf"))
            result["comfyui_gguf"] = "loaded"
        except Exception as exc:  # noqa: BLE001 - what it raises is the finding
            result["comfyui_gguf"] = f"{type(exc).__name__}: {exc}"
        # a TAG-MoE file labelled qwen_image (not what 'tagmoe convert' writes): its reader takes it, experts and
        # all, and the dense model it builds next would drop them; the pack does not patch another pack's code
        try:
            state = loader.gguf_sd_loader(str(relabelled(out / "tiny-Q8_0.gguf", out / "moe-as-qwen.gguf")))
            result["comfyui_gguf_relabelled"] = {"read": len(state),
                                                 "experts": sum(".img_mlp.experts." in k for k in state)}
        except Exception as exc:  # noqa: BLE001 - what it raises is the finding
            result["comfyui_gguf_relabelled"] = f"{type(exc).__name__}: {exc}"
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
