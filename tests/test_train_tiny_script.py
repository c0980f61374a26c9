"""scripts/train_tiny.py end to end at a toy size: every stage runs, the report has each part, and the
trained VAE is also written as a ComfyUI file (Wan 2.1 keys at the shape ComfyUI builds) that
decodes as the diffusers VAE does."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tagmoe_core.training import synthetic

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_tiny.py"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The script's --threads sets torch's thread count for the process: give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_vae_training_fast_path_computes_what_encode_then_decode_does():
    """The script trains its VAE through a cache-free round trip with 2-D convolutions and a one-pass
    RMS norm: the values, and the gradients, of diffusers' own encode -> sample -> decode."""
    from diffusers import AutoencoderKLQwenImage

    script = _script()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    with torch.no_grad():  # a random VAE decodes near 0: scale up so that the clamp to -1..1 takes part
        vae.decoder.conv_out.weight.mul_(30.0)
    x = torch.rand(2, 3, 1, 32, 32) * 2 - 1
    noise = torch.randn(2, 16, 1, 4, 4)

    dist = vae.encode(x).latent_dist
    reference = vae.decode(dist.mean + dist.std * noise).sample
    reference.pow(2).mean().backward()
    # (the temporal convolutions of the resampling blocks see no single frame: no gradient either way)
    reference_grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    vae.zero_grad(set_to_none=True)
    with script.SingleFrameConvs(), script.FastRMSNorm():
        decoded, mean, logvar = script.single_frame_round_trip(vae, x, noise)
    decoded.pow(2).mean().backward()

    assert (reference.abs() == 1).any() and (reference.abs() < 1).any()
    torch.testing.assert_close(mean, dist.mean, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logvar, dist.logvar, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(decoded, reference, atol=2e-4, rtol=1e-3)  # x30 decoder: float rounding
    trained = {n: p for n, p in vae.named_parameters() if p.grad is not None}
    assert set(trained) == set(reference_grads) and len(trained) > 50
    for name, param in trained.items():  # conv kernels: only the last temporal slice meets a frame, both ways
        torch.testing.assert_close(param.grad, reference_grads[name], atol=2e-4, rtol=1e-3, msg=name)


def _vae_and_batch():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    return vae, torch.rand(4, 3, 1, 32, 32) * 2 - 1, torch.randn(4, 16, 1, 4, 4)


def _step_grads(script, vae, x, noise, use_compile: bool, linear: float = 0.0):
    vae.zero_grad(set_to_none=True)
    step = script.VAEStep(vae, 1e-4, 0.0, use_compile, linear=linear)
    with script.SingleFrameConvs(), script.FastRMSNorm():
        rec, kl = step(x, noise)
    return step, rec, kl, {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


def test_a_vae_step_whose_compiling_fails_runs_eagerly_with_the_same_gradients(monkeypatch):
    """Where torch.compile cannot build the step (no C++ compiler: it fails at the first call, here
    after a backward that had left gradients, as a failing backward graph would), the step says so
    once, drops what the failed call left and runs eagerly: the eager step's values."""
    script = _script()
    vae, x, noise = _vae_and_batch()
    _, rec, kl, grads = _step_grads(script, vae, x, noise, use_compile=False)
    expected_rec = (script.single_frame_round_trip(vae, x, noise)[0] - x).pow(2).mean()
    torch.testing.assert_close(rec, expected_rec.detach())

    calls = []

    def broken_compile(fn):
        def compiled(*args):
            calls.append(args)
            (fn(*args)[0] * 3.0).backward()  # gradients land (wrong ones) before the failure
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    step, rec2, kl2, grads2 = _step_grads(script, vae, x, noise, use_compile=True)
    assert len(calls) == 1 and not step.compiled and "InvalidCxxCompiler" in step.failed
    torch.testing.assert_close(rec2, rec)
    torch.testing.assert_close(kl2, kl)
    assert grads2.keys() == grads.keys() and len(grads) > 50
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], msg=name)
    step(x, noise)  # later steps go straight to the eager function
    assert len(calls) == 1

    def refusing_compile(fn):  # a platform torch.compile does not support: refused when asked
        raise RuntimeError("torch.compile is not supported on Python 3.15+")

    monkeypatch.setattr(torch, "compile", refusing_compile)
    step, rec3, _, grads3 = _step_grads(script, vae, x, noise, use_compile=True)
    assert not step.compiled and "not supported" in step.failed
    torch.testing.assert_close(rec3, rec)
    for name in grads:
        torch.testing.assert_close(grads3[name], grads[name], msg=name)


@pytest.mark.slow
def test_the_compiled_vae_step_gives_the_eager_gradients():
    """The default step runs through torch.compile (Inductor's CPU kernels: about a minute to build),
    with the block-means tie as the script's default has it: the same loss and gradients as the eager
    step within float rounding."""
    script = _script()
    vae, x, noise = _vae_and_batch()
    _, rec, kl, grads = _step_grads(script, vae, x, noise, use_compile=False, linear=1.0)
    step, rec2, kl2, grads2 = _step_grads(script, vae, x, noise, use_compile=True, linear=1.0)
    if step.failed:
        pytest.skip(f"torch.compile cannot build here: {step.failed}")
    assert step.compiled
    torch.testing.assert_close(rec2, rec, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kl2, kl, atol=1e-5, rtol=1e-4)
    assert grads2.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads2[name], grads[name], atol=1e-5, rtol=1e-3, msg=name)


def test_vae_linear_ties_twelve_latent_channels_to_the_block_means_of_the_picture():
    """--vae-linear adds weight x the mean square between the posterior means' first 12 channels (diffusers'
    own encode) and each latent pixel's four 4x4-pixel blocks' mean colours, ordered colour-major."""
    script = _script()
    vae, x, noise = _vae_and_batch()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    blocks = torch.empty(4, 12, 1, 4, 4)
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                for i in range(4):
                    for j in range(4):
                        window = x[:, c, 0, 8 * i + 4 * dy:8 * i + 4 * dy + 4, 8 * j + 4 * dx:8 * j + 4 * dx + 4]
                        blocks[:, 4 * c + 2 * dy + dx, 0, i, j] = window.mean(dim=(1, 2))
    torch.testing.assert_close(script.block_means(x), blocks)
    with torch.no_grad(), script.SingleFrameConvs(), script.FastRMSNorm():
        plain, rec, kl = script.vae_step_losses(vae, x, noise, 1e-4, 0.0)
        tied, rec2, kl2 = script.vae_step_losses(vae, x, noise, 1e-4, 0.0, linear=0.5)
    assert torch.equal(rec, rec2) and torch.equal(kl, kl2)
    torch.testing.assert_close(tied - plain, 0.5 * (mean[:, :12] - blocks).pow(2).mean(), atol=1e-5, rtol=1e-4)


def test_the_decoder_phase_trains_the_decoder_and_leaves_the_latents_where_they_were():
    from argparse import Namespace

    from diffusers import AutoencoderKLQwenImage

    script = _script()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    data = torch.rand(6, 3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(data).latent_dist.mean
        decoded = vae.decode(latents).sample
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    args = Namespace(vae_decoder_steps=3, vae_decoder_lr=1e-2, vae_crop=16, vae_batch=4, vae_l1=0.1)
    steps, seconds = script.train_decoder(vae, data, args, torch.Generator().manual_seed(0))
    assert steps == 3 and seconds > 0
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(data).latent_dist.mean, latents, atol=0, rtol=0)
        assert (vae.decode(latents).sample - decoded).abs().max() > 1e-4
    assert any(not torch.equal(v, decoder[k]) for k, v in vae.decoder.state_dict().items())
    assert all(p.requires_grad for p in vae.parameters())  # handed back trainable, as it came


def test_the_decoder_phase_on_a_finished_vae_keeps_it_finished():
    """After the collapse and the flattening the decoder phase trains the decoder on the point latents:
    the posterior stays a point, the encoder does not move, the flattened channels' post_quant_conv
    columns stay as they were (failed before: they drifted, making the decoder see those channels), a
    deadline that has passed stops it after one step, and the VAE comes back in eval mode."""
    from argparse import Namespace

    from diffusers import AutoencoderKLQwenImage

    from tagmoe_core.training.bundle import collapse_posterior, is_collapsed

    script = _script()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    with torch.no_grad():
        collapse_posterior(vae)
        vae.quant_conv.weight[3].zero_()  # channel 3 flattened as flatten_unused_channels does
        vae.quant_conv.bias[3] = 0.7
    data = torch.rand(6, 3, 1, 32, 32) * 2 - 1
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    quant, post = vae.quant_conv.weight.clone(), vae.post_quant_conv.weight.clone()
    args = Namespace(vae_decoder_steps=3, vae_decoder_lr=1e-2, vae_crop=16, vae_batch=4, vae_l1=0.0)
    assert script.train_decoder(vae, data, args, torch.Generator().manual_seed(0))[0] == 3
    assert is_collapsed(vae) and not vae.training and torch.equal(vae.quant_conv.weight, quant)
    assert all(torch.equal(v, encoder[k]) for k, v in vae.encoder.state_dict().items())
    assert torch.equal(vae.post_quant_conv.weight[:, 3], post[:, 3])
    assert not torch.equal(vae.post_quant_conv.weight[:, :3], post[:, :3])
    assert script.train_decoder(vae, data, args, torch.Generator().manual_seed(0), deadline=0.0)[0] == 1
    assert script.train_decoder(vae, data, Namespace(**{**vars(args), "vae_decoder_steps": 0}),
                               torch.Generator())[0] == 0


def _vae_only(script, out, *extra):
    return script.main([str(out), "--count", "7", "--heldout-count", "7", "--only-vae", "--vae-steps", "4",
                        "--vae-decoder-steps", "0", "--no-vae-compile", "--vae-base-dim", "8", "--threads", "1",
                        *extra])


@pytest.mark.parametrize("flags, message", [
    (["--vae-crop", "20"], "--vae-crop must be 0 or a multiple of 8"),
    (["--vae-crop", "72"], "up to 64 (the pictures' side), got 72"),
    (["--vae-restart-at", "0"], "--vae-restart-at must be at least 1"),
    (["--vae-restarts", "64"], "--vae-restarts from 0 to 63"),
    (["--seed", "-1"], "--seed must be from 0 to 2**32 - 1"),
    (["--size", "72"], "--size: the synthetic images' width must be a multiple of 16 of at least 48, got 72"),
    (["--size", "96", "--vae-crop", "104"], "up to 96 (the pictures' side), got 104"),
])
def test_bad_settings_are_refused_in_one_line_before_any_work(tmp_path, capsys, flags, message):
    script = _script()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "run"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_size_draws_every_split_at_that_size(tmp_path):
    from PIL import Image

    script = _script()
    out = tmp_path / "run"
    assert _vae_only(script, out, "--size", "96", "--vae-crop", "96") == 0
    for split in ("train", "heldout"):
        manifest = json.loads((out / "data" / split / synthetic.MANIFEST_FILE).read_text())
        assert (manifest["width"], manifest["height"]) == (96, 96)
        assert {Image.open(f).size for f in (out / "data" / split).glob("*.png")} == {(96, 96)}
    # the unseen samples a finished run is judged on again are drawn at the run's size too
    assert {Image.open(f).size for f in script.unseen_after_run(out, 2).glob("*.png")} == {(96, 96)}


def test_a_vae_still_at_the_mean_colour_starts_again(tmp_path):
    """--vae-restart-at: a VAE whose mse (last 100 steps) is over --vae-restart-mse then starts again from
    a new initialisation (``restart_seed``), at most --vae-restarts times; the report lists the restarts
    and counts the kept start's steps. One under the bound goes on (and with --vae-restarts 0 any does).
    At learning rate 0 the VAEs keep their initial weights, which says which start each one is."""
    from diffusers import AutoencoderKLQwenImage

    script = _script()
    at = ["--vae-restart-at", "2", "--vae-lr", "0"]
    assert _vae_only(script, tmp_path / "again", *at, "--vae-restart-mse", "0", "--vae-restarts", "1") == 0
    assert _vae_only(script, tmp_path / "on", *at, "--vae-restart-mse", "100") == 0
    assert _vae_only(script, tmp_path / "never", *at, "--vae-restart-mse", "0", "--vae-restarts", "0") == 0
    again, on, never = (json.loads((tmp_path / name / "report.json").read_text())["vae"]
                        for name in ("again", "on", "never"))
    assert [r["step"] for r in again["restarts"]] == [2] and again["restarts"][0]["mse"] > 0
    assert (again["steps"], again["steps_total"]) == (4, 6) and (on["steps"], on["steps_total"]) == (4, 4)
    assert on["restarts"] == [] and never["restarts"] == []

    def initial(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                      temperal_downsample=[False, True, True]).encoder.conv_in.weight

    def trained(name: str) -> torch.Tensor:
        return AutoencoderKLQwenImage.from_pretrained(tmp_path / name / "vae").encoder.conv_in.weight

    assert script.restart_seed(0, 1) not in (0, 1)
    for name, seed in (("again", script.restart_seed(0, 1)), ("on", 0), ("never", 0)):
        torch.testing.assert_close(trained(name), initial(seed), rtol=0, atol=0, msg=name)
    assert not torch.equal(initial(0), initial(script.restart_seed(0, 1)))


def test_minutes_shortens_the_schedule_to_what_fits_the_host():
    script = _script()
    # 200 steps in 60 s: 0.3 s a step, so 90% of 10 minutes fit 1800 of 5500 steps; a fast host keeps the recipe's
    assert script.FIT_SHARE == 0.9 and script.steps_that_fit(5500, 200, 60.0, 10.0) == 1800
    assert script.steps_that_fit(5500, 200, 10.0, 10.0) == 5500
    assert script.steps_that_fit(5500, 200, 60.0, 0.0) == 5500  # no cap
    assert script.steps_that_fit(5500, 200, 6000.0, 10.0) == 201  # already past the minutes: stop next step


@pytest.mark.slow
def test_train_tiny_runs_every_stage_and_writes_a_comfyui_vae(tmp_path):
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import load_file

    from tagmoe_core.model.vae_keys import diffusers_qwen_vae_to_comfy
    from tagmoe_core.model.vae_widen import widen
    from tagmoe_core.training.bundle import is_collapsed

    script = _script()
    out = tmp_path / "run"
    assert script.main([str(out), "--count", "14", "--heldout-count", "7", "--vae-steps", "3", "--vae-crop", "32",
                        "--vae-decoder-steps", "2", "--no-vae-compile", "--eval-unseen", "7",
                        "--steps", "3", "--warmup", "2", "--eval-steps", "2", "--eval-limit", "7", "--eval-train", "3",
                        "--heads", "2", "--head-dim", "16", "--threads", "1", "--weight-decay", "0.05"]) == 0
    report = json.loads((out / "report.json").read_text())
    # --weight-decay reaches every optimizer group, Muon's and AdamW's (the checkpoint's optimizer state)
    from tagmoe_core.training.checkpoints import latest_checkpoint, load_state
    groups = load_state(latest_checkpoint(out / "run"))["optimizer"]["param_groups"]
    assert report["transformer"]["weight_decay"] == 0.05 and {g["weight_decay"] for g in groups} == {0.05}
    assert report["vae"]["steps"] == 3 and report["vae"]["decoder_steps"] == 2 and report["transformer"]["steps"] == 3
    assert report["transformer"]["steps_asked"] == 3 and not report["transformer"]["shortened_by_minutes"]
    assert report["vae"]["compiled"] is False
    # the unseen split: the 7 samples after the 14 training ones, judged as the others
    assert [s.index for s in synthetic.read_tasks(out / "data" / "unseen")] == list(range(14, 21))
    assert report["eval_unseen"]["n"] == 7 and set(report["eval_unseen"]["tasks"]) == set(report["eval"]["tasks"])
    assert report["eval"]["n"] == 7 and set(report["vae"]["heldout_target_ceiling"]) == set(report["eval"]["tasks"])
    assert report["eval_train"]["n"] == 3 and set(report["eval_train"]["tasks"]) == {"recolour", "add", "remove"}
    for result in (report["eval"], report["eval_train"]):  # a random transformer fails: every failure names a check
        for row in result["tasks"].values():
            failures = round(row["n"] * (1 - row["success"]))
            assert failures == 0 or (row["failed_checks"] and max(row["failed_checks"].values()) <= row["n"])
            assert sum(row["failed_checks"].values()) >= failures
            counts = [tuple(map(int, v.split("/"))) for v in row["by_input_objects"].values()]
            assert sum(n for _, n in counts) == row["n"] and sum(ok for ok, _ in counts) == row["n"] - failures
        for task, row in result["tasks"].items():  # no input picture: 0; an add's may be empty; others 1 or 2
            allowed = {"text2image": {"0"}, "add": {"0", "1"}}.get(task, {"1", "2"})
            assert row["by_input_objects"] and set(row["by_input_objects"]) <= allowed, (task, row["by_input_objects"])
    # a finished run judged again, here with tag-guided routing: its own report, the run's left as it was
    # (unseen samples: the first of the run's own folder, or more of them, after the run's --count, apart)
    assert script.main([str(out), "--evaluate-only", "--eval-steps", "2", "--eval-limit", "7",
                        "--eval-tag-guidance", "1", "--eval-train", "0", "--eval-unseen", "3", "--threads", "1"]) == 0
    judged = json.loads((out / "eval_cfg1_steps2_tg1_n7_unseen3.json").read_text())
    again = judged["eval"]
    assert judged["eval_unseen"]["n"] == 3 and not (out / "data" / "unseen_3").exists()
    assert script.main([str(out), "--evaluate-only", "--eval-steps", "2", "--eval-limit", "1", "--eval-unseen", "9",
                        "--threads", "1"]) == 0
    assert json.loads((out / "eval_cfg1_steps2_tg0_n1_unseen9.json").read_text())["eval_unseen"]["n"] == 9
    assert [s.index for s in synthetic.read_tasks(out / "data" / "unseen_9")] == list(range(14, 23))
    assert [s.index for s in synthetic.read_tasks(out / "data" / "unseen")] == list(range(14, 21))
    assert again["n"] == 7 and again["tag_guidance"] == 1.0 and set(again["tasks"]) == set(report["eval"]["tasks"])
    assert json.loads((out / "report.json").read_text()) == report
    comfy = Path(report["vae"]["comfyui_file"])
    assert comfy == out / "qwen_image_vae_tiny.safetensors"
    state = load_file(comfy)
    vae = AutoencoderKLQwenImage.from_pretrained(out / "vae")
    z = vae.config.z_dim  # the shipped VAE's posterior is a point: an edit's condition is not resampled noise
    assert not vae.quant_conv.weight[z:].any() and bool((vae.quant_conv.bias[z:] == -30).all())
    expected = diffusers_qwen_vae_to_comfy(widen(vae).state_dict())
    assert set(state) == set(expected) and "decoder.middle.0.residual.0.gamma" in state
    for key, tensor in expected.items():
        torch.testing.assert_close(state[key].float(), tensor.to(torch.bfloat16).float())
    # --vae-from finishes an earlier run's VAE as a trained one is: an older one with a wide posterior too
    with torch.no_grad():
        vae.quant_conv.bias[z:] = 0.0
    vae.save_pretrained(tmp_path / "older_vae")
    assert script.main([str(tmp_path / "reuse"), "--count", "7", "--heldout-count", "7", "--only-vae",
                        "--vae-from", str(tmp_path / "older_vae"), "--vae-decoder-steps", "2", "--threads", "1"]) == 0
    reused = AutoencoderKLQwenImage.from_pretrained(tmp_path / "reuse" / "vae")
    assert is_collapsed(reused)
    # ... and its decoder phase (after the collapse, on the latents it will decode) moved the decoder only;
    # the round trip is measured again, the earlier run's figures kept apart
    reuse_report = json.loads((tmp_path / "reuse" / "report.json").read_text())["vae"]
    assert reuse_report["decoder_steps"] == 2 and reuse_report["from"] == str(tmp_path / "older_vae")
    assert 0 < reuse_report["heldout_psnr_mean"] < 100 and "earlier" not in reuse_report  # (no report there)
    torch.testing.assert_close(reused.encoder.state_dict(), vae.encoder.state_dict(), rtol=0, atol=0)
    assert not torch.equal(reused.decoder.conv_out.weight, vae.decoder.conv_out.weight)
