"""Every node run through its ComfyUI entry points (INPUT_TYPES / FUNCTION) on the tiny model."""

from __future__ import annotations

import shutil

import pytest
import torch
from node_harness import PACK_ERROR, REPO, load_pack, run_node

PROMPT = "Change the cloak to red color"


@pytest.fixture(scope="module")
def pack():
    return load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def models_dir(tiny_bundle, tmp_path_factory, pack):
    root = tmp_path_factory.mktemp("models")
    (root / "diffusers").mkdir()
    (root / "tagmoe").mkdir()
    (root / "diffusion_models").mkdir()
    (root / "diffusers" / "Qwen-Image-tiny").symlink_to(tiny_bundle.base)
    shutil.copytree(tiny_bundle.tagmoe, root / "tagmoe" / "TAG-MoE-tiny")
    shutil.copy(tiny_bundle.base / "transformer" / "diffusion_pytorch_model.safetensors",
                root / "diffusion_models" / "qwen_image_dense.safetensors")
    pack.nodes.comfy_bridge.configure(root)
    return root


@pytest.fixture
def model(nodes, models_dir):  # the loader keeps the model: reloads only if a test replaced it
    (handle, info), ui = run_node(nodes["TagMoEModelLoader"], base_model="Qwen-Image-tiny",
                                  tagmoe_weights="TAG-MoE-tiny/", device="cpu")
    return handle


@pytest.fixture
def cond(nodes, model):
    return run_node(nodes["TagMoETextEncode"], model=model, prompt=PROMPT, negative_prompt="")[0][0]


def comfy_image(h=40, w=72, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, h, w, 3, generator=g)


def test_pack_exports_and_categories(pack, nodes):
    assert set(nodes) == {"TagMoEModelLoader", "TagMoETextEncode", "TagMoESampler", "TagMoEDecode", "TagMoETaskTags",
                          "TagMoEPromptRefine", "TagMoERoutingMap", "TagMoELoadDiffusionModel",
                          "TagMoEEditConditioning", "TagMoEScheduler", "TagMoECFGGuider", "TagMoECFG", "TagMoENoise",
                          "TagMoELoraLoader", "TagMoETagGuidance", "TagMoERecordRouting", "TagMoETextEncodeDiffusers"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes)
    assert pack.WEB_DIRECTORY == "./web" and (REPO / "web").is_dir()
    for cls in nodes.values():
        assert cls.CATEGORY == "TAG-MoE" and cls.DESCRIPTION
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                assert len(entry) > 1 and entry[1].get("tooltip"), f"{cls.__name__}.{name} has no tooltip"


def test_pack_root_imports_as_a_plain_module():
    """pytest imports the repository's __init__.py as a top-level module when the checkout's
    folder name is not an identifier ("comfyui-tagmoe"); a relative import there failed every
    test at setup (found by CI in a clean clone)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("__init__", REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.WEB_DIRECTORY == "./web"


def test_loader_lists_models_and_reports_placement(nodes, models_dir, model):
    spec = nodes["TagMoEModelLoader"].INPUT_TYPES()["required"]
    assert spec["base_model"][0] == ["Qwen-Image-tiny", "tiny-shapes (embedded)"]  # the user's, then the shipped one
    assert "TAG-MoE-tiny/" in spec["tagmoe_weights"][0]
    assert "qwen_image_dense.safetensors" in spec["tagmoe_weights"][0]
    assert not any(".safetensors" in w and "TAG-MoE-tiny/" in w for w in spec["tagmoe_weights"][0])
    assert "transformer: cpu" in model.info and "float32" in model.info and "MoE backend: torch" in model.info
    assert "placement: single" in model.info and "why: cpu" in model.info


def test_loader_keeps_the_model_and_replaces_it_on_change(nodes, models_dir, model):
    (again, _), ui = run_node(nodes["TagMoEModelLoader"], base_model="Qwen-Image-tiny",
                              tagmoe_weights="TAG-MoE-tiny/", device="cpu")
    assert again is model and ui["text"] == [model.info]


def test_loader_errors(nodes, models_dir, pack):
    # a base model not in the list fails ComfyUI's own check of that input (the harness makes it)
    with pytest.raises(AssertionError, match="base_model: 'missing-folder' not in"):
        run_node(nodes["TagMoEModelLoader"], base_model="missing-folder", tagmoe_weights="TAG-MoE-tiny/")
    # one listed when the graph was made but gone since: the loader says what to do, before loading
    with pytest.raises(PACK_ERROR, match="the base model was not found: put the Qwen-Image diffusers folder"):
        nodes["TagMoEModelLoader"]().load(base_model="missing-folder", tagmoe_weights="TAG-MoE-tiny/")
    with pytest.raises(ValueError, match="TAG-MoE weights were not found"):
        run_node(nodes["TagMoEModelLoader"], base_model="Qwen-Image-tiny", tagmoe_weights="nope.safetensors")


def test_wrong_weights_file_is_a_clear_error_and_keeps_the_loaded_model(nodes, models_dir, pack, model, cond):
    errors = pack.nodes.diffusers.loader.TagMoEError.__module__
    loader = nodes["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="no MoE expert weights found") as info:
        run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="qwen_image_dense.safetensors", device="cpu")
    assert type(info.value).__module__ == errors
    assert model.pipe is not None  # checked before the loaded model was let go
    run_node(nodes["TagMoESampler"], model=model, conditioning=cond, seed=0, steps=1, width=32, height=32)


def test_loading_another_model_releases_the_previous_one(nodes, models_dir, tiny_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    state = {}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, models_dir / "tagmoe" / "single-file.safetensors")
    loader = nodes["TagMoEModelLoader"]
    (first, _), _ = run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="TAG-MoE-tiny/", device="cpu")
    (second, _), _ = run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="single-file.safetensors",
                              device="cpu")
    assert second is not first and first.pipe is None and second.pipe is not None
    with pytest.raises(PACK_ERROR, match="run the TAG-MoE Model Loader again"):
        first.require()
    # ComfyUI re-runs the loader with the first inputs: IS_CHANGED says so now that it was released
    first_inputs = {"base_model": "Qwen-Image-tiny", "tagmoe_weights": "TAG-MoE-tiny/", "device": "cpu"}
    second_inputs = first_inputs | {"tagmoe_weights": "single-file.safetensors"}
    changed = loader.IS_CHANGED(**first_inputs)
    assert changed != changed  # NaN: never equal to the cached value, so ComfyUI executes again
    assert loader.IS_CHANGED(**second_inputs) == "loaded"



def test_loader_can_ignore_unexpected_keys(nodes, models_dir, tiny_bundle):
    from safetensors.torch import load_file, save_file

    state = {"ema.shadow.weight": torch.zeros(2)}
    for shard in sorted((tiny_bundle.tagmoe / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    save_file(state, models_dir / "tagmoe" / "with-extra-keys.safetensors")
    loader = nodes["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="ema.shadow.weight.*turn on ignore_unexpected_keys") as info:
        run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="with-extra-keys.safetensors", device="cpu")
    assert "strict=False" not in str(info.value)
    (handle, _), _ = run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="with-extra-keys.safetensors",
                              device="cpu", ignore_unexpected_keys=True)
    assert handle.pipe.load_report.ignored_keys == ["ema.shadow.weight"]
    assert loader.INPUT_TYPES()["optional"]["ignore_unexpected_keys"][1]["default"] is False

def test_text_to_image_edit_and_decode(nodes, model, cond):
    sampler, decode = nodes["TagMoESampler"], nodes["TagMoEDecode"]
    (latent, seed, _), ui = run_node(sampler, model=model, conditioning=cond, seed=42, steps=2, cfg=4.0, width=48,
                                  height=32)
    assert seed == 42 and ui["seed"] == [42] and "seed 42" in ui["text"][0]
    assert latent["samples"].shape == (1, 16, 1, 4, 6) and latent["samples"].dtype == torch.float32
    (image,), _ = run_node(decode, model=model, latent=latent)
    assert image.shape == (1, 32, 48, 3) and 0 <= image.min() and image.max() <= 1

    (edited, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=42, steps=2, cfg=4.0, width=64,
                              height=48, image=comfy_image())
    (again, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=42, steps=2, cfg=4.0, width=64,
                             height=48, image=comfy_image())
    assert torch.equal(edited["samples"], again["samples"])
    assert edited["tagmoe_original_size"] == [(72, 40)]
    (restored,), _ = run_node(decode, model=model, latent=edited, keep_original_size=True)
    assert restored.shape == (1, 40, 72, 3)


def test_batches(nodes, model, cond):
    sampler = nodes["TagMoESampler"]
    images = comfy_image(batch=2)
    (latent, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=1, steps=1, width=32, height=32,
                              image=images, images_per_prompt=2)
    assert latent["samples"].shape[0] == 4
    (single, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=1, steps=1, width=32, height=32,
                              image=images[1:], images_per_prompt=2)
    assert torch.equal(latent["samples"][2:], single["samples"])  # each image as if alone, same seed
    (decoded,), _ = run_node(nodes["TagMoEDecode"], model=model, latent=latent)
    assert decoded.shape == (4, 32, 32, 3)


def test_mask_region_edit(nodes, model, cond):
    sampler = nodes["TagMoESampler"]
    image = comfy_image(h=64, w=64)
    mask = torch.zeros(1, 64, 64)
    mask[0, 8:24, 40:60] = 1.0
    seen = []
    pipe = model.pipe
    handle = pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(kw["hidden_states"].shape[1]),
                                                    with_kwargs=True)
    try:
        (region, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=3, steps=1, width=64, height=64,
                                  image=image, mask=mask)
        (full, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=3, steps=1, width=64, height=64,
                                image=image)
    finally:
        handle.remove()
    # 4x4 target tokens; the mask's box covers patch columns 2-3 and rows 0-1 of the 4x4 grid
    assert seen[0] == 16 + 4 and seen[-1] == 16 + 16
    assert not torch.equal(region["samples"], full["samples"])


@pytest.mark.parametrize("kwargs, message", [
    ({"mask": torch.ones(1, 10, 10)}, "the mask is 10x10 but the image is 72x40"),
    ({"mask": torch.zeros(1, 40, 72)}, "the mask is empty"),
    ({"mask": torch.ones(3, 40, 72)}, "3 masks for 1 images"),
    ({"width": 0, "height": 32}, "set both width and height"),
    ({"width": 50, "height": 32}, "multiple of 16"),
    ({"image": torch.rand(1, 40, 72)}, "expected an IMAGE"),
    ({"latent": {"samples": torch.zeros(1, 4, 8, 8)}}, "16 channels"),
])
def test_sampler_bad_inputs(nodes, model, cond, kwargs, message):
    inputs = {"model": model, "conditioning": cond, "seed": 0, "steps": 1, "cfg": 4.0, "width": 32, "height": 32,
              "image": comfy_image()} | kwargs
    with pytest.raises(PACK_ERROR, match=message) as info:
        run_node(nodes["TagMoESampler"], **inputs)
    assert "TagMoEError" in [c.__name__ for c in type(info.value).__mro__]  # a message, not a crash


def test_mask_without_image(nodes, model, cond):
    with pytest.raises(PACK_ERROR, match="a mask needs an image"):
        nodes["TagMoESampler"]().sample(model, cond, 0, 1, 4.0, 32, 32, mask=torch.ones(1, 32, 32))


def test_progress_previews_and_cancel(nodes, model, cond, pack):
    bridge = pack.nodes.comfy_bridge
    sampler = nodes["TagMoESampler"]
    progress = []
    original = bridge.Progress.update

    def spy(self, value, preview_latents=None):
        original(self, value, preview_latents)
        progress.append(self.updates[-1])

    bridge.Progress.update = spy
    try:
        run_node(sampler, model=model, conditioning=cond, seed=5, steps=3, width=32, height=32, image=comfy_image())
    finally:
        bridge.Progress.update = original
    assert progress == [(1, 3, True), (2, 3, True), (3, 3, True)]

    (reference, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=5, steps=3, width=32, height=32)
    bridge.interrupt()
    with pytest.raises(bridge.cancellation_types()):
        run_node(sampler, model=model, conditioning=cond, seed=5, steps=3, width=32, height=32)
    (after, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=5, steps=3, width=32, height=32)
    assert torch.equal(after["samples"], reference["samples"])  # the model is still usable, same result


def test_latent_in_comfy_formats(nodes, model, cond):
    sampler, decode = nodes["TagMoESampler"], nodes["TagMoEDecode"]
    (start, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=2, steps=2, width=32, height=48)
    four_d = {"samples": start["samples"][:, :, 0]}  # e.g. from an empty-latent node
    (image,), _ = run_node(decode, model=model, latent=four_d)
    assert image.shape == (1, 48, 32, 3)
    (img2img, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=3, steps=4, latent=four_d, denoise=0.5)
    assert img2img["samples"].shape == (1, 16, 1, 6, 4)  # size from the latent
    batch = {"samples": torch.cat([start["samples"]] * 2)}  # a batch of two single-frame latents
    (img2img, _, _), _ = run_node(sampler, model=model, conditioning=cond, seed=3, steps=4, latent=batch, denoise=0.5)
    assert img2img["samples"].shape == (2, 16, 1, 6, 4)


def test_video_latents_are_refused(nodes, model, cond):
    """A LATENT with several frames (ComfyUI's VAE Encode of an IMAGE batch: one video) is not a
    batch of images, so it is refused, saying what to do; it was taken as two images."""
    sampler, decode = nodes["TagMoESampler"], nodes["TagMoEDecode"]
    frames = {"samples": torch.randn(1, 16, 2, 6, 4)}
    with pytest.raises(PACK_ERROR, match="2 frames.*Rebatch Images"):
        run_node(sampler, model=model, conditioning=cond, seed=3, steps=2, latent=frames, denoise=0.5)
    with pytest.raises(PACK_ERROR, match="2 frames"):
        run_node(decode, model=model, latent=frames)


def test_video_frames_are_not_the_images_of_the_batch(model):
    """Why: Qwen-Image's VAE (Wan 2.1's, what ComfyUI's VAE Encode runs) compresses time 4x after
    the first frame. Two images encode to one frame (the second is lost), five to two frames, the
    second mixing four images, so no frame but the first is an image's latent."""
    vae = model.require().vae
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        video = lambda n: vae.encode(images[:n].permute(1, 0, 2, 3)[None]).latent_dist.mode()  # noqa: E731
        alone = vae.encode(images[1:2, :, None]).latent_dist.mode()
        two, five = video(2), video(5)
    assert two.shape[2] == 1 and five.shape[2] == 2
    assert (five[:, :, 1] - alone[:, :, 0]).abs().max() > 0.1


def test_text_encode_with_image(nodes, model):
    (cond,), _ = run_node(nodes["TagMoETextEncode"], model=model, prompt=PROMPT, negative_prompt="blurry",
                          image=comfy_image())
    assert cond.negative_prompt == "blurry" and cond.positive.embeds.shape[1] > 8


def test_unloaded_model_is_a_clear_error(pack):
    handle = pack.nodes.diffusers.loader.TagMoEModel(None, "gone")
    with pytest.raises(PACK_ERROR, match="run the TAG-MoE Model Loader again"):
        handle.require()


def test_pack_loads_under_any_folder_name(tmp_path):
    target = tmp_path / "custom_nodes" / "ComfyUI-TAG-MoE.v2 (copy)"
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".git", ".venv*", "tests", "out", "bench",
                                                                 "__pycache__", ".ci-cache", "*.egg-info"))
    module = load_pack(target)
    assert "TagMoESampler" in module.NODE_CLASS_MAPPINGS


def test_loader_placement_options(nodes, models_dir, pack):
    loader = nodes["TagMoEModelLoader"]
    with pytest.raises(PACK_ERROR, match="use 'single'"):
        run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="TAG-MoE-tiny/", device="cpu",
                 placement="block-swap")
    (fp8, info), _ = run_node(loader, base_model="Qwen-Image-tiny", tagmoe_weights="TAG-MoE-tiny/", device="cpu",
                              fp8_weights=True, drop_text_encoder=True)
    assert "fp8 weights" in info and "text encoder: host memory" in info
    parse = pack.nodes.diffusers.loader.parse_gib_caps
    assert parse("", "0") is None and parse("20", "0,1") == {0: 20 * 2**30, 1: 20 * 2**30}
    assert parse("10, 30.5", "cuda:0,cuda:2") == {0: 10 * 2**30, 2: int(30.5 * 2**30)}
    for bad in ("lots", "1,2,3", "-4"):
        with pytest.raises(PACK_ERROR, match="gpu_memory_gib"):
            parse(bad, "0,1")


# ComfyUI rejects an API prompt that lacks a required input, so a new required input breaks
# every saved prompt: new options must be optional. This pins the required sets.
STABLE_REQUIRED = {
    "TagMoEModelLoader": {"base_model", "tagmoe_weights", "device", "dtype", "moe_backend"},
    "TagMoETextEncode": {"model", "prompt", "negative_prompt"},
    "TagMoESampler": {"model", "conditioning", "seed", "steps", "cfg", "width", "height", "images_per_prompt"},
    "TagMoEDecode": {"model", "latent", "keep_original_size"},
    "TagMoETaskTags": {"mode", "scope", "tags", "edits_an_image"},
    "TagMoEPromptRefine": {"image", "instruction", "backend", "seed", "temperature", "max_new_tokens"},
    "TagMoERoutingMap": {"routing", "layers", "steps"},
    "TagMoELoadDiffusionModel": {"weights", "weight_dtype"},
    "TagMoEEditConditioning": {"positive", "negative", "vae", "image"},
    "TagMoEScheduler": {"steps", "denoise"},
    "TagMoECFGGuider": {"model", "positive", "negative", "cfg"},
    "TagMoECFG": {"model"},
    "TagMoENoise": {"model", "noise_seed", "draw_on"},
    "TagMoELoraLoader": {"model", "lora_name", "strength_model"},
    "TagMoETagGuidance": {"model", "tags", "strength"},
    "TagMoERecordRouting": {"model"},
    "TagMoETextEncodeDiffusers": {"base_model", "text"},
}


def test_required_inputs_are_a_stable_contract(nodes):
    assert {name: set(cls.INPUT_TYPES()["required"]) for name, cls in nodes.items()} == STABLE_REQUIRED


def test_decode_in_tiles(nodes, model):
    decode = nodes["TagMoEDecode"]
    torch.manual_seed(0)
    latent = {"samples": torch.randn(1, 16, 1, 36, 36)}
    (whole,), _ = run_node(decode, model=model, latent=latent)
    (tiled,), _ = run_node(decode, model=model, latent=latent, tiled="always")
    assert tiled.shape == whole.shape == (1, 288, 288, 3) and not torch.equal(tiled, whole)
    with pytest.raises(PACK_ERROR, match="tiled must be one of auto, always, never"):  # an API prompt
        decode().decode(model, latent, tiled="sometimes")  # that skipped ComfyUI's validation


def test_errors_are_reported_with_the_librarys_name_not_a_path(pack):
    """ComfyUI names an error's type module + class; the pack's modules are named after its folder's path."""
    errors = pack.tagmoe_core.errors
    assert "/" in errors.__name__ or "_x_" in errors.__name__  # how ComfyUI (and the harness) import the pack
    for cls in (errors.TagMoEError, errors.InputError, errors.MissingKeysError):
        assert cls.__module__ == "tagmoe_core.errors", cls.__module__


def test_a_loader_validation_error_names_only_the_input_it_is_about(nodes):
    import inspect

    for name in ("TagMoEModelLoader", "TagMoELoadDiffusionModel"):
        assert len(inspect.signature(nodes[name].VALIDATE_INPUTS).parameters) == 1, name


def test_an_empty_prompt_is_encoded_with_a_warning(nodes, model):
    (cond,), ui = run_node(nodes["TagMoETextEncode"], model=model, prompt="  ", negative_prompt="")
    assert cond.positive.embeds.shape[1] > 0 and "prompt is empty" in ui["text"][0]
    _, ui = run_node(nodes["TagMoETextEncode"], model=model, prompt=PROMPT, negative_prompt="")
    assert not ui


def test_a_region_as_fractions_is_the_same_edit_as_a_mask_of_that_box(nodes, model, cond):
    image = comfy_image(40, 72)
    mask = torch.zeros(1, 40, 72)
    mask[:, 8:32, 18:54] = 1.0
    common = {"model": model, "conditioning": cond, "seed": 3, "steps": 2, "cfg": 4.0, "width": 64, "height": 32,
              "images_per_prompt": 1, "image": image}
    (by_mask, _, _), _ = run_node(nodes["TagMoESampler"], mask=mask, **common)
    (by_region, _, _), _ = run_node(nodes["TagMoESampler"], region="0.25,0.2,0.75,0.8", **common)
    (whole, _, _), _ = run_node(nodes["TagMoESampler"], **common)
    assert torch.equal(by_mask["samples"], by_region["samples"])
    assert not torch.equal(by_region["samples"], whole["samples"])
    with pytest.raises(PACK_ERROR, match="fractions"):
        run_node(nodes["TagMoESampler"], region="0.5,0.5,0.2,0.9", **common)
