"""training.bundle: a bundle assembled from (here: random tiny) parts loads through the core."""

from __future__ import annotations

import json

import pytest
import torch

from tagmoe_core.tiny import ensure_tiny_bundle
from tagmoe_core.training.bundle import assemble_bundle, latent_stats


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return ensure_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


def test_assembled_bundle_uses_the_given_parts_and_loads(source, tmp_path):
    from diffusers import AutoencoderKLQwenImage

    from tagmoe_core.pipeline.builder import load_pipeline

    vae = AutoencoderKLQwenImage.from_pretrained(source.base / "vae")
    mean, std = [0.5] * 16, [2.0] * 16
    vae.register_to_config(latents_mean=mean, latents_std=std)
    vae.save_pretrained(tmp_path / "vae")
    transformer = tmp_path / "transformer"
    import shutil
    shutil.copytree(source.tagmoe / "transformer", transformer)

    bundle = assemble_bundle(source, tmp_path / "out", vae=tmp_path / "vae", transformer=transformer,
                             note={"checkpoint": "x"})
    assert json.loads((bundle.root / "COMPLETE").read_text()) == {"trained": True, "checkpoint": "x"}
    assert json.loads((bundle.base / "vae" / "config.json").read_text())["latents_std"] == std
    for part in ("text_encoder", "tokenizer", "scheduler", "transformer"):
        assert sorted(p.name for p in (bundle.base / part).iterdir()) == \
            sorted(p.name for p in (source.base / part).iterdir())
    pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    assert list(pipe.vae.config.latents_mean) == mean
    # Assembling again replaces the folder; without parts given, the source's own are used.
    again = assemble_bundle(source, tmp_path / "out")
    assert json.loads((again.base / "vae" / "config.json").read_text())["latents_std"] != std


def test_assemble_refuses_a_missing_part(source, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        assemble_bundle(source, tmp_path / "out", vae=tmp_path / "nowhere")


def test_latent_stats_per_channel():
    latents = torch.zeros(4, 3, 1, 2, 2)
    latents[:, 1] = 5.0
    latents[:, 2, :, 0] = 1.0
    latents[:, 2, :, 1] = -1.0
    mean, std = latent_stats(latents)
    assert mean == pytest.approx([0.0, 5.0, 0.0])
    assert std[0] == pytest.approx(1e-6) and std[1] == pytest.approx(1e-6)
    assert std[2] == pytest.approx(1.0, rel=0.1)
