"""The seams that newer ComfyUI changes, checked on whichever ComfyUI tree runs this (cwd), in a
subprocess started by test_comfyui_newer.py; measurements go to ``$TAGMOE_OUT/result.json``.

* **dynamic-VRAM Linear** (newest ``comfy/ops.py``, which no runnable tree here has): with dynamic
  VRAM on, ``operations.Linear`` is built with ``weight = bias = None`` and creates them in
  ``_load_from_state_dict`` from the file's tensors, in the file's dtype (copied, or kept as they are
  when loading with ``assign``); a Linear handed a state dict without its keys gets zero
  placeholders and reports them missing. :class:`LazyOps` behaves so (written from that reading),
  and goes in through ComfyUI's ``custom_operations``; loading with it must equal a normal load;
* **CoreModelPatcher** (the newest core's patcher for diffusion models, rebound to
  ``ModelPatcherDynamic`` at start-up): emulated as a ModelPatcher whose ``is_dynamic()`` is true,
  so the loader must load with ``assign`` and register ``cached_patcher_init``;
* **rotary positions** through the ``post_input`` patch give the ids the embedder fallback gives,
  and compose with another pack's later patch; other reference methods keep ComfyUI's with a log;
* **TorchCompileModel** (ComfyUI's node) on the TAG-MoE MODEL matches eager.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, os.getcwd())  # ComfyUI
sys.path.append(str(HERE))

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import comfy.model_management  # noqa: E402,F401
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import torch  # noqa: E402
from node_harness import REPO, load_pack  # noqa: E402


class LazyOps(comfy.ops.disable_weight_init):
    """``operations`` whose Linear behaves as newest ComfyUI's under dynamic VRAM."""

    class Linear(comfy.ops.disable_weight_init.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = None
            self.bias = None
            self.comfy_need_lazy_init_bias = bias
            self.weight_comfy_model_dtype = self.bias_comfy_model_dtype = dtype

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                  error_msgs):
            assign = local_metadata.get("assign_to_params_buffers", False)
            for key, value in state_dict.items():
                name = key[len(prefix):]
                if name in ("weight", "bias") and value is not None:
                    setattr(self, name, torch.nn.Parameter(value if assign else value.clone(), requires_grad=False))
                else:
                    unexpected_keys.append(key)
            if self.weight is None:  # newest ComfyUI's placeholder, (in, out) as it makes it
                self.weight = torch.nn.Parameter(torch.zeros(self.in_features, self.out_features), requires_grad=False)
                missing_keys.append(prefix + "weight")
            if self.bias is None and self.comfy_need_lazy_init_bias:
                self.bias = torch.nn.Parameter(torch.zeros(self.out_features), requires_grad=False)
                missing_keys.append(prefix + "bias")


class NewestModelPatcher(comfy.model_patcher.ModelPatcher):
    """Newest ComfyUI's ModelPatcher: its size is computed at the first model_size() call, not at
    construction (its loaders make the patcher before the lazy weights exist)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.size = 0


class EmulatedCorePatcher(NewestModelPatcher):
    """Stands for newest ComfyUI's CoreModelPatcher with dynamic VRAM on (is_dynamic: load with assign)."""

    def is_dynamic(self):
        return True


def main() -> None:
    out = Path(os.environ["TAGMOE_OUT"])
    tiny = os.environ["TAGMOE_TINY"]
    pack = load_pack(REPO)
    import importlib

    comfy_model = importlib.import_module(pack.__name__ + ".nodes.comfy_model")
    positions = importlib.import_module(pack.__name__ + ".nodes.comfy_positions")
    errors = importlib.import_module(pack.__name__ + ".tagmoe_core.errors")
    result: dict = {"comfy_version": _version()}

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 6, 10, generator=gen)  # a 3x5 patch grid: odd, so the two centrings differ
    context = torch.randn(1, 7, 32, generator=gen)
    ref = torch.randn(1, 16, 1, 6, 10, generator=gen)
    sigma = torch.tensor([0.7])

    def call(patcher, x=x, refs=(ref,), context=context, **conds) -> torch.Tensor:
        comfy.model_management.load_models_gpu([patcher])
        # as ComfyUI's samplers hand them to the model: the patcher's transformer_options and wrappers
        options = {**patcher.model_options.get("transformer_options", {}), "wrappers": patcher.wrappers}
        with torch.inference_mode():
            return _apply_model(patcher, x, sigma.expand(x.shape[0]), context, list(refs), options, **conds).clone()

    normal = comfy_model.load_tagmoe_model(tiny).patcher
    want = call(normal)
    torch.save(want, out / "model_call.pt")  # compared with the other ComfyUI trees' by the test
    weights = {k: v for k, v in normal.model.diffusion_model.state_dict().items()}

    # -- dynamic-VRAM Linear ------------------------------------------------------------------------------------------
    bare, _, _ = comfy_model.new_tagmoe_model(*_layout(comfy_model, tiny), custom_operations=LazyOps)
    linears = [m for m in bare.diffusion_model.modules() if isinstance(m, LazyOps.Linear)]
    result["lazy_linears"] = len(linears)
    result["lazy_weights_none_before_load"] = sum(m.weight is None for m in linears)
    result["lazy_state_dict_keys_before_load"] = len(bare.diffusion_model.state_dict())
    result["normal_state_dict_keys"] = len(weights)
    for core in (NewestModelPatcher, EmulatedCorePatcher):  # dynamic VRAM off, on
        name = "lazy" if core is NewestModelPatcher else "lazy_dynamic"
        saved = getattr(comfy.model_patcher, "CoreModelPatcher", None)
        comfy.model_patcher.CoreModelPatcher = core
        try:
            lazy = comfy_model.load_tagmoe_model(tiny, custom_operations=LazyOps).patcher
        finally:
            if saved is None:
                vars(comfy.model_patcher).pop("CoreModelPatcher", None)
            else:
                comfy.model_patcher.CoreModelPatcher = saved
        state = lazy.model.diffusion_model.state_dict()
        result[f"{name}_patcher_class"] = type(lazy).__name__
        result[f"{name}_keys_equal"] = sorted(state) == sorted(weights)
        result[f"{name}_weights_max_diff"] = max(float((state[k].float() - v.float()).abs().max())
                                                for k, v in weights.items())
        result[f"{name}_call_max_diff"] = float((call(lazy) - want).abs().max())
        result[f"{name}_patcher_size"] = lazy.model_size()
        result[f"{name}_reload"] = [getattr(lazy.cached_patcher_init[0], "__name__", "?"),
                                    [getattr(a, "__name__", a) for a in lazy.cached_patcher_init[1]]]
        if core is EmulatedCorePatcher:
            fresh = lazy.cached_patcher_init[0](*lazy.cached_patcher_init[1], disable_dynamic=True)
            result["reload_non_dynamic_class"] = type(fresh).__name__
            result["reload_call_max_diff"] = float((call(fresh) - want).abs().max())
    # ComfyUI-MultiGPU (and ComfyUI before cached_patcher_init) deep-copies the model for another device
    try:
        copied = copy.deepcopy(normal.model)
    except TypeError as exc:
        try:  # ComfyUI's own model config object: if it cannot be copied, no model of this ComfyUI can
            copy.deepcopy(normal.model.model_config)
            raise
        except TypeError:
            result["deepcopy_call_max_diff"] = f"this ComfyUI's model config cannot be deep-copied ({exc})"
    else:
        twin = comfy.model_patcher.ModelPatcher(copied, normal.load_device, normal.offload_device)
        twin.wrappers, twin.model_options = copy.deepcopy(normal.wrappers), copy.deepcopy(normal.model_options)
        result["deepcopy_call_max_diff"] = float((call(twin) - want).abs().max())
    result["normal_patcher_size"] = normal.model_size()
    result["normal_weight_bytes"] = sum(t.nbytes for t in normal.model.state_dict().values())

    # bad files still get their one-line errors before loading, with lazy Linears too
    result["bad_files"] = {}
    for label, edit in (("missing", lambda sd: sd.pop(sorted(k for k in sd if ".experts.1.w2" in k or
                                                                ".experts.mlp.w2" in k)[0])),
                        ("shape", lambda sd: sd.__setitem__("proj_out.weight", sd["proj_out.weight"][:-1]))):
        path = _edited_copy(tiny, out / f"bad-{label}", edit)
        chunks = comfy_model.LinearExpertsCheckpoint.chunks
        comfy_model.LinearExpertsCheckpoint.chunks = _no_reading  # the error must come before any weight is read
        try:
            comfy_model.load_tagmoe_model(path, custom_operations=LazyOps)
            result["bad_files"][label] = "loaded"
        except errors.TagMoEError as exc:
            result["bad_files"][label] = f"{type(exc).__name__}: {exc}"
        finally:
            comfy_model.LinearExpertsCheckpoint.chunks = chunks

    # a cancel during loading (newer ComfyUI's InterruptProcessingException is a BaseException): it stops
    # the load and no model comes back
    comfy.model_management.interrupt_current_processing(True)
    try:
        comfy_model.load_tagmoe_model(tiny)
        result["interrupted_load"] = "loaded"
    except BaseException as exc:  # noqa: BLE001 - what ComfyUI raises is the point
        result["interrupted_load"] = type(exc).__name__
    finally:
        comfy.model_management.interrupt_current_processing(False)

    # -- rotary positions --------------------------------------------------------------------------------------------
    embedder = normal.model.diffusion_model.pe_embedder
    seen: dict[str, torch.Tensor] = {}
    hooks = [embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("comfy", a[0].clone())),
             embedder.embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("used", a[0].clone()))]
    call(normal)
    for hook in hooks:
        hook.remove()
    comfy_ids, fallback_ids = seen["comfy"], seen["used"]
    text_len = context.shape[1]
    plan = positions.position_plan(x, [ref], None, None, context)
    token = positions._PLAN.set(plan)
    try:
        patched = positions.post_input_patch({"img": None, "txt": None, "img_ids": comfy_ids[:, text_len:],
                                              "txt_ids": comfy_ids[:, :text_len], "transformer_options": {}})
        later = {**patched, "img_ids": patched["img_ids"] + 100}  # another pack's patch, registered after
        result["embedder_keeps_later_patch"] = bool(torch.equal(
            _embedded_ids(embedder, torch.cat([later["txt_ids"], later["img_ids"]], 1)),
            torch.cat([later["txt_ids"], later["img_ids"]], 1)))
    finally:
        positions._PLAN.reset(token)
    via_patch = torch.cat([patched["txt_ids"], patched["img_ids"]], 1)
    result["ids_differ_from_comfyuis"] = not torch.equal(comfy_ids, fallback_ids)
    result["post_input_ids_equal_fallback"] = bool(torch.equal(via_patch, fallback_ids))
    result["post_input_registered"] = positions.post_input_patch in normal.model_options.get(
        "transformer_options", {}).get("patches", {}).get("post_input", [])

    # whole model calls through an emulated newer Qwen-Image, which runs the post_input patches on
    # (txt_ids, img_ids) before its rotary embedding: batch 2, another size, a region, a later pack's patch
    emulated = _with_post_input_loop(normal)
    batch = {"x": torch.cat([x, x.flip(-1)]), "refs": [torch.cat([ref, -ref])], "context": torch.cat([context] * 2)}
    small = {"x": x[..., :4, :6], "refs": [ref[..., :4, :6]], "context": context[:, :5]}
    region = {"refs": [ref[..., :4, :4]], positions.REGION_KEY: (3, 5, (0, 0, 1, 1))}
    result["post_input_loop_max_diff"] = {
        label: float((call(emulated, **inputs) - call(normal, **inputs)).abs().max())
        for label, inputs in (("one", {}), ("batch of 2", batch), ("2x3 grid", small), ("region", region))}
    later = emulated.clone()
    later.set_model_patch(lambda args: {**args, "img_ids": args["img_ids"] + 100}, "post_input")
    seen_ids: list[torch.Tensor] = []
    hook = embedder.embedder.register_forward_pre_hook(lambda m, a: seen_ids.append(a[0].clone()))
    call(emulated)
    call(later)
    hook.remove()
    result["later_patch_moves_tagmoe_ids"] = bool(torch.equal(seen_ids[1][:, text_len:],
                                                              seen_ids[0][:, text_len:] + 100))

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("tagmoe").addHandler(handler)
    other = call(normal, ref_latents_method="negative_index")
    call(normal, ref_latents_method="negative_index")
    # a patcher built around the model by another node, without TAG-MoE's hooks: said, not silent
    rebuilt = comfy.model_patcher.ModelPatcher(normal.model, normal.load_device, normal.offload_device)
    without_hooks = call(rebuilt)
    positions.install(rebuilt)
    with_hooks = call(rebuilt)
    logging.getLogger("tagmoe").removeHandler(handler)
    result["other_method_logs"] = [r for r in records if "negative_index" in r]
    result["other_method_changes_output"] = float((other - want).abs().max())
    result["no_hooks_logs"] = [r for r in records if "without TAG-MoE's position hooks" in r]
    result["no_hooks_changes_output"] = float((without_hooks - want).abs().max())
    result["hooks_installed_max_diff"] = float((with_hooks - want).abs().max())

    # -- TorchCompileModel -------------------------------------------------------------------------------------------
    region_b = {**region, positions.REGION_KEY: (3, 5, (2, 1, 3, 2))}  # same shapes, other positions
    eager_a, eager_b = call(normal, **region), call(normal, **region_b)
    result["region_positions_change_output"] = float((eager_a - eager_b).abs().max())
    result["compile"] = _compile_check(normal, call, [({}, want), (region, eager_a), (region_b, eager_b)])
    (out / "result.json").write_text(json.dumps(result))


def _no_reading(*args, **kwargs):
    raise AssertionError("weights were read before the file was checked")


def _apply_model(patcher, x, sigma, context, refs, transformer_options, **conds):
    kwargs = {"ref_latents": refs, **conds}
    return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=transformer_options, **kwargs)


def _embedded_ids(embedder, ids):
    """The ids ReferencePositions hands to EmbedND for ``ids`` (a forward pre-hook catches them)."""
    seen = {}
    hook = embedder.embedder.register_forward_pre_hook(lambda m, a: seen.__setitem__("ids", a[0].clone()))
    try:
        embedder(ids)
    finally:
        hook.remove()
    return seen["ids"]


def _layout(comfy_model, tiny):
    ckpt = comfy_model.LinearExpertsCheckpoint.open(tiny)
    try:
        return ckpt.dims, ckpt.spec, ckpt.blocks
    finally:
        ckpt.close()


def _edited_copy(tiny, folder: Path, edit) -> Path:
    """The tiny TAG-MoE transformer merged into one file in ``folder`` (beside its config.json), edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = Path(tiny) / "transformer"
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    edit(state)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "config.json", folder / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


def _compile_check(patcher, call, cases) -> dict:
    """ComfyUI's TorchCompileModel on the MODEL; each case ``(conds, eager output)`` called compiled. Two
    cases differ only in positions (a region at two places): a graph that baked one call's positions in
    would give the second the first's."""
    import importlib
    import inspect

    node, errors = None, []
    for name in ("comfy_extras.nodes_torch_compile", "comfy_extras.nodes.nodes_torch_compile"):  # the fork's
        try:
            node = importlib.import_module(name).TorchCompileModel
            break
        except Exception as exc:  # noqa: BLE001 - a tree without the node: say so
            errors.append(f"{type(exc).__name__}: {exc}")
    if node is None:
        return {"skipped": errors[0]}
    execute = getattr(node, "execute", None)
    if execute:
        compiled = execute(patcher, "inductor")
    elif "object_patch" in inspect.signature(node.patch).parameters:
        # the fork's (model, object_patch, fullgraph, dynamic, backend, mode): it also passes options, which
        # torch.compile takes only without a mode
        compiled = node().patch(patcher, backend="inductor", mode=None)
    else:
        compiled = node().patch(patcher, "inductor")
    compiled = compiled[0] if isinstance(compiled, tuple) else getattr(compiled, "result", (compiled,))[0]
    if compiled is patcher:  # the fork logs a failed compile and hands the model back as it was
        return {"max_diff": float("inf"), "error": "TorchCompileModel returned the model itself: compiling failed "
                "(see the log)"}
    start = time.perf_counter()
    diffs = [float((call(compiled, **conds) - want).abs().max()) for conds, want in cases]
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = float((call(compiled) - cases[0][1]).abs().max())
    return {"max_diff": max(diffs), "per_case": diffs, "again_max_diff": again,
            "compile_and_calls_s": round(first_s, 1), "second_call_s": round(time.perf_counter() - start, 3)}


def _with_post_input_loop(patcher):
    """A clone whose model runs the ``post_input`` patches on (txt_ids, img_ids) right before its rotary
    embedding, as newer ComfyUI's Qwen-Image does (0.3.64 and 0.10 have no such patch)."""
    emulated = patcher.clone()
    state: dict = {}

    def diffusion_model(executor, x, timestep, context, *args, **kwargs):
        options = args[-1] if args and isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        state.update(options=options, text_len=context.shape[1])
        try:
            return executor(x, timestep, context, *args, **kwargs)
        finally:
            state.clear()

    def before_embedding(module, inputs):
        if not state:
            return None
        ids, text_len = inputs[0], state["text_len"]
        args = {"img": None, "txt": None, "img_ids": ids[:, text_len:], "txt_ids": ids[:, :text_len],
                "transformer_options": state["options"]}
        for patch in state["options"].get("patches", {}).get("post_input", []):
            args = patch(args)
        return (torch.cat([args["txt_ids"], args["img_ids"]], dim=1),)

    import comfy.patcher_extension as pe

    emulated.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "emulated_post_input", diffusion_model)
    embedder = patcher.model.diffusion_model.pe_embedder
    if not getattr(embedder, "_emulated_post_input", False):
        embedder.register_forward_pre_hook(before_embedding)
        embedder._emulated_post_input = True
    return emulated


def _version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        import comfy

        return getattr(comfy, "__version__", "?")


if __name__ == "__main__":
    main()
