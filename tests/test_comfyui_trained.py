"""The trained tiny model through the native ComfyUI graph a user builds: the same edits succeed as
through ``tagmoe_core`` (``tagmoe edit``), pixel for pixel within float rounding; from its weights
folder and from Q4_0 and Q4_K ``.gguf`` files of it (quantized in ComfyUI's memory, dequantized at each
forward; the core dequantizes the same file at load).

TAG-MoE Load Diffusion Model, TAG-MoE Text Encode (diffusers folder), Load Image, ComfyUI's Load VAE
(the trained VAE in ComfyUI's layout), TAG-MoE Edit Conditioning, TAG-MoE Scheduler / CFG Guider /
Noise, SamplerCustomAdvanced, ComfyUI's VAE Decode and Save Image, on held-out samples of the
synthetic task set, judged by its pixel rule. ``TAGMOE_NATIVE_SAMPLES=N`` judges the first N held-out
samples instead of the CI check's twelve (text-to-image ones through an empty latent).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from comfy_server import COMFYUI_DIR, TRAINED_BASE, TRAINED_GGUF, TRAINED_VAE, TRAINED_WEIGHTS, images_of, \
    run_prompt, same_on_every_tree

pytestmark = [pytest.mark.comfyui,
              pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout")]

STEPS, CFG = 20, 1.0
MAX_PIXEL_DIFF = 3  # of 255: float rounding between two implementations of one computation


def allowed_disagreements(count: int) -> int:
    """A verdict may differ where an output sits on a bound of the rule and a pixel level moves it across
    (measured on the whole held-out split, 140 samples, on ComfyUI 0.3.64 and on the hiddenswitch fork:
    the first shipped model, one invert at 25.0 dB against the 25 dB bound; the second, three: a drawn
    shape's fill at 0.678 against the core's 0.681 across the shape bound, a grayscale whose left-over
    speck crosses the object-size bound, a background change at 25.0 against 25.3 dB; the largest pixel
    difference 2 / 255 in both). About one in fifty, with room for one more: 1 + n // 35 (4 of 140)."""
    return 1 + count // 35


def _specs():
    from tagmoe_core.training import synthetic
    from test_tiny_trained import checked_samples

    count = int(os.environ.get("TAGMOE_NATIVE_SAMPLES", "0"))
    return synthetic.make_samples(count, split="heldout") if count else checked_samples()


def _prompt(spec, image_name: str | None, weights: str) -> dict:
    graph = {
        "1": {"class_type": "TagMoELoadDiffusionModel", "inputs": {"weights": weights,
                                                                   "weight_dtype": "default"}},
        "2": {"class_type": "TagMoETextEncodeDiffusers", "inputs": {"base_model": TRAINED_BASE,
                                                                    "text": spec.instruction}},
        "3": {"class_type": "TagMoETextEncodeDiffusers", "inputs": {"base_model": TRAINED_BASE, "text": ""}},
        "5": {"class_type": "VAELoader", "inputs": {"vae_name": TRAINED_VAE}},
    }
    if image_name is not None:
        graph["4"] = {"class_type": "LoadImage", "inputs": {"image": image_name}}
        graph["6"] = {"class_type": "TagMoEEditConditioning", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "vae": ["5", 0], "image": ["4", 0],
            "width": spec.width, "height": spec.height}}
        positive, negative, latent = ["6", 0], ["6", 1], ["6", 2]
    else:
        graph["6"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": spec.width, "height": spec.height,
                                                                      "batch_size": 1}}
        positive, negative, latent = ["2", 0], ["3", 0], ["6", 0]
    graph.update({
        "20": {"class_type": "TagMoEScheduler", "inputs": {"steps": STEPS, "denoise": 1.0, "latent": latent}},
        "21": {"class_type": "TagMoECFGGuider", "inputs": {"model": ["1", 0], "positive": positive,
                                                           "negative": negative, "cfg": CFG}},
        "22": {"class_type": "TagMoENoise", "inputs": {"model": ["1", 0], "noise_seed": spec.index,
                                                       "draw_on": "reference (model device and dtype)"}},
        "23": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "24": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["22", 0], "guider": ["21", 0],
                                                                 "sampler": ["23", 0], "sigmas": ["20", 0],
                                                                 "latent_image": latent}},
        "25": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["5", 0]}},
        "26": {"class_type": "SaveImage", "inputs": {"images": ["25", 0], "filename_prefix": f"shapes_{spec.index}"}},
    })
    return graph


@pytest.mark.parametrize("weights", ["folder", "Q4_0", "Q4_K"])
def test_held_out_edits_succeed_in_comfyui_as_in_the_core(comfy_server, weights):
    import torch
    from tagmoe_core.pipeline.builder import load_pipeline
    from tagmoe_core.tiny import trained_tiny_bundle
    from tagmoe_core.training.evaluation import judge_sample
    from tagmoe_core.training.task_success import check_task

    bundle = trained_tiny_bundle()
    listed = f"{TRAINED_WEIGHTS}/" if weights == "folder" else TRAINED_GGUF.replace("Q4_0", weights)
    source_weights = bundle.tagmoe if weights == "folder" else comfy_server["home"] / "models/diffusion_models" / listed
    core = load_pipeline(bundle.base, source_weights, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    native_ok, core_ok, worst, outputs, disagreements = [], [], 0, [], []
    for spec in _specs():
        source = spec.input_image()
        name = None
        if source is not None:
            name = f"shapes_{spec.split}_{spec.index}.png"
            source.save(comfy_server["home"] / "input" / name)
        native = images_of(comfy_server, run_prompt(comfy_server, _prompt(spec, name, listed)))["26"][0]
        judged = judge_sample(core, spec, seed=spec.index, steps=STEPS, cfg=CFG)
        diff = int(np.abs(np.asarray(native, dtype=np.int16) - np.asarray(judged.output, dtype=np.int16)).max())
        worst = max(worst, diff)
        outputs.append(np.asarray(native))
        verdict = check_task(source, spec, native)
        native_ok.append(verdict.ok)
        core_ok.append(judged.ok)
        if verdict.ok != judged.ok:
            disagreements.append(f"{spec.split} {spec.index}: native {verdict.summary()}; "
                                 f"core {judged.verdict.summary()}")
    count = len(native_ok)
    print(f"trained tiny model ({weights}), {count} held-out samples: native graph {sum(native_ok)}/{count} succeed, "
          f"tagmoe_core {sum(core_ok)}/{count}; largest pixel difference {worst}/255; verdicts that differ: "
          f"{disagreements or 'none'}")
    stacked = torch.tensor(np.stack(outputs))
    for tree, tree_diff in same_on_every_tree(f"trained-shapes-{weights}-{count}", stacked).items():
        assert tree_diff <= MAX_PIXEL_DIFF, (tree, tree_diff)
    assert worst <= MAX_PIXEL_DIFF
    assert len(disagreements) <= allowed_disagreements(count), disagreements
    if not os.environ.get("TAGMOE_NATIVE_SAMPLES"):  # the CI check's twelve: edits that really happen
        from test_tiny_trained import MIN_SUCCESSES

        assert sum(native_ok) >= MIN_SUCCESSES
