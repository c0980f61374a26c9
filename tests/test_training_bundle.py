"""training.bundle: a bundle assembled from (here: random tiny) parts loads through the core."""

from __future__ import annotations

import json

import pytest
import torch

from tagmoe_core.tiny import ensure_tiny_bundle
from tagmoe_core.training.bundle import (
    assemble_bundle, collapse_posterior, flatten_unused_channels, fold_latent_stats, is_collapsed, latent_stats,
    pack_bundle)


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


def test_folding_latent_stats_gives_the_target_statistics_and_the_same_pictures():
    """A VAE whose latents are measured at (mean, std) is rescaled to its config's statistics
    (Qwen-Image's own): encoded latents then have those, decoded pictures are unchanged."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    x = torch.rand(6, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        before = vae.encode(x).latent_dist
        mean, std = latent_stats(before.mean)
        decoded = vae.decode(before.mean).sample
        fold_latent_stats(vae, mean, std)
        after = vae.encode(x).latent_dist
        target_mean, target_std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
        got_mean, got_std = latent_stats(after.mean)
        close = torch.testing.assert_close
        close(torch.tensor(got_mean), target_mean, atol=1e-4, rtol=0)
        close(torch.tensor(got_std), target_std, atol=0, rtol=1e-4)
        # normalised latents are unchanged, and so are the pictures decoded from them
        view = (1, 16, 1, 1, 1)
        close((after.mean - target_mean.view(view)) / target_std.view(view),
              (before.mean - torch.tensor(mean).view(view)) / torch.tensor(std).view(view), atol=1e-4, rtol=0)
        close(after.std / target_std.view(view), before.std / torch.tensor(std).view(view), atol=0, rtol=1e-4)
        close(vae.decode(after.mean).sample, decoded, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        fold_latent_stats(vae, mean[:4], std[:4])


def test_a_collapsed_posterior_samples_its_mean_and_decodes_the_same_pictures(source):
    """A small VAE leaves unused channels at the prior: the condition image an edit samples was mostly noise
    (two draws far apart). Collapsed, every draw is the mean, and the pipeline's condition tokens with it."""
    from PIL import Image

    from tagmoe_core.pipeline.builder import load_pipeline

    pipe = load_pipeline(source.base, source.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                         placement="single")
    picture = Image.new("RGB", (64, 48), (200, 60, 40))
    picture.paste((30, 60, 220), (16, 8, 40, 32))

    def draws():
        return [pipe.prepare_condition(picture, 64, 48, generator=torch.Generator().manual_seed(s)).tokens
                for s in (0, 1)]

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    before = draws()
    mode = pipe.prepare_condition(picture, 64, 48, posterior="mode").tokens
    assert rel(before[0], before[1]) > 0.1  # the random tiny VAE's posterior: wide
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        decoded = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        assert not is_collapsed(pipe.vae)
        collapse_posterior(pipe.vae)
        assert is_collapsed(pipe.vae)
        after = draws()
        torch.testing.assert_close(after[0], mode, atol=1e-5, rtol=0)
        torch.testing.assert_close(after[1], mode, atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample, decoded)


def test_channels_the_decoder_ignores_become_constant_and_the_pictures_stay():
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
        pictures = torch.rand(8, 3, 1, 32, 32) * 2 - 1
        others = torch.rand(4, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        vae.post_quant_conv.weight[:, [3, 7]] = 0  # the decoder never reads channels 3 and 7
        vae.post_quant_conv.weight[:, [0, 5]] *= 50  # and leans on 0 and 5
    with torch.no_grad():
        before = vae.decode(vae.encode(others).latent_dist.mode()).sample
        unused = flatten_unused_channels(vae, pictures)
        posterior = vae.encode(others).latent_dist
        after = vae.decode(posterior.mode()).sample
    assert {3, 7} <= set(unused) and not {0, 5} & set(unused)
    for c in unused:  # for any picture: the config's latents_mean (0 once normalised), with a point posterior
        torch.testing.assert_close(posterior.mode()[:, c], torch.full_like(posterior.mode()[:, c],
                                                                            vae.config.latents_mean[c]))
        assert float(posterior.std[:, c].max()) < 1e-6
    assert 10 * torch.log10(4 / ((after - before) ** 2).mean()) > 40  # the pictures barely move


def test_a_packed_bundle_is_fp16_without_the_base_weights_and_samples_as_the_original(source, tmp_path):
    """What scripts/pack_tiny.py ships: every weight in fp16, the dense base transformer's weights left
    out (the TAG-MoE checkpoint is complete), the demo picture and the card; it loads as the shipped
    model does and samples within fp16 rounding of the original."""
    from PIL import Image
    from safetensors import safe_open

    from tagmoe_core.pipeline.builder import load_pipeline

    packed = pack_bundle(source, tmp_path / "packed", demo_picture=Image.new("RGB", (64, 64), (200, 40, 40)),
                         card="# card\n")
    assert (packed.root / "demo.png").is_file() and (packed.tagmoe / "transformer" / "config.json").is_file()
    assert not list((packed.base / "transformer").glob("*.safetensors*"))
    assert (packed.root / "README.md").read_text() == "# card\n" and not (packed.root / "COMPLETE").exists()
    weights = sorted(packed.root.rglob("*.safetensors"))
    assert len(weights) >= 3
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"F16", "I64"}, path
    outputs = []
    for bundle in (source, packed):
        pipe = load_pipeline(bundle.base, bundle.tagmoe, device="cpu", dtype=torch.float32, backend="torch",
                             placement="single")
        outputs.append(pipe.sample(pipe.encode("Remove the circle", ""), Image.new("RGB", (32, 32), (40, 80, 220)),
                                   width=32, height=32, steps=2, cfg=1.0, seed=0).latents)
    relative = float((outputs[1] - outputs[0]).norm() / outputs[0].norm())
    assert 0 < relative < 5e-3, relative
