"""Training the tiny TAG-MoE for real: the loss falls, only what should train changes, checkpoints load
through the core loader with the trained model's outputs, and a resumed run is the uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from train_data import make_data

from tagmoe_core.cli import main
from tagmoe_core.errors import InputError
from tagmoe_core.pipeline.builder import load_pipeline
from tagmoe_core.training.checkpoints import COMPLETE, LORA_FILE, STATE_FILE
from tagmoe_core.training.loop import TrainConfig, prepare, saved_steps, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train") / "data")


def _config(tiny_bundle, data, output, **kw) -> TrainConfig:
    kw.setdefault("lr", 1e-3)
    return TrainConfig(data=str(data), output=str(output), base=str(tiny_bundle.base), tagmoe=str(tiny_bundle.tagmoe),
                       device="cpu", **kw)


def _weights(folder) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted((folder / "transformer").glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def _forward(transformer, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 24, 64, generator=generator)
    text = torch.randn(1, 6, 32, generator=generator)
    with torch.no_grad():
        return transformer(hidden_states=hidden, timestep=torch.tensor([0.6]), encoder_hidden_states=text,
                           img_shapes=[[(1, 3, 4), (1, 3, 4)]], return_dict=False)[0]


@pytest.mark.parametrize("mode", ["whole", "moe", "lora", "whole-muon"])
def test_training_steps_lower_the_loss_on_a_fixed_batch_and_train_only_their_part(mode, tiny_bundle, data, tmp_path):
    mode, _, optimizer = mode.partition("-")
    trainer = prepare(_config(tiny_bundle, data, tmp_path / "o", train=mode, lr=3e-3 if mode == "whole" else 1e-2,
                              optimizer=optimizer or "adamw"))
    before_weights = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}
    inputs = trainer.step_inputs(0)
    with torch.no_grad():
        before = trainer.losses(*inputs).as_dict()
    for _ in range(8):
        trainer.step(inputs)
    with torch.no_grad():
        after = trainer.losses(*inputs).as_dict()
    # Only 2 of the tiny model's 4 image FFNs are MoE layers: a whole run moves the flow loss the most.
    flow_share = 0.7 if mode == "whole" else 0.985
    assert after["loss"] < 0.92 * before["loss"] and after["flow"] < flow_share * before["flow"], (before, after)
    assert after["align"] < 0.5 * before["align"], (before, after)
    changed = {k for k, v in trainer.transformer.state_dict().items() if not torch.equal(v, before_weights[k])}
    heads = {k for k in before_weights if k.startswith(("tag_embedding.", "router_head."))}
    moe = {k for k in before_weights if ".img_mlp.router." in k or ".img_mlp.experts.mlp." in k}
    if mode == "whole":
        assert "img_in.weight" in changed and "transformer_blocks.0.attn.to_q.weight" in changed and moe <= changed
    elif mode == "moe":
        assert changed == moe | heads
    else:  # the adapters train; the model's own weights stay, the merged ones move
        assert changed == heads
        merged = trainer.release_state_dict()
        assert not torch.equal(merged["transformer_blocks.0.attn.to_q.weight"],
                               before_weights["transformer_blocks.0.attn.to_q.weight"])
    assert not any(k.endswith("experts.bias") for k in changed)  # never used: never trained


@pytest.mark.parametrize("mode", ["moe", "lora"])
def test_a_training_checkpoint_loads_through_the_core_loader_with_the_trained_outputs(mode, tiny_bundle, data,
                                                                                      tmp_path):
    result = train(_config(tiny_bundle, data, tmp_path / "o", train=mode, steps=3))
    checkpoint = result.checkpoint
    assert checkpoint.name == "checkpoint-000003" and (checkpoint / COMPLETE).is_file()
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / LORA_FILE).is_file() == (mode == "lora")
    trained = result.trainer.transformer.eval()
    loaded = load_pipeline(tiny_bundle.base, checkpoint, device="cpu")
    assert loaded.load_report.keys_from_base == 0  # a complete checkpoint in the release layout
    assert set(_weights(checkpoint)) == set(_weights(tiny_bundle.tagmoe))
    for seed in (0, 1):
        expected, got = _forward(trained, seed), _forward(loaded.transformer, seed)
        if mode == "moe":
            assert torch.equal(expected, got)
        else:  # W x + s B(A x) in memory, (W + s B A) x loaded
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    original = load_pipeline(tiny_bundle.base, tiny_bundle.tagmoe, device="cpu")
    assert not torch.allclose(_forward(original.transformer), _forward(loaded.transformer), atol=1e-4)


@pytest.mark.parametrize("mode, ema", [("moe", 0.0), ("lora", 0.0), ("moe", 0.9), ("lora", 0.9),
                                       ("whole-muon", 0.0)])
def test_resume_continues_exactly_as_an_uninterrupted_run(mode, ema, tiny_bundle, data, tmp_path):
    # With a moving average the checkpoint's model is the average: the resumed run must go on from the
    # live weights and the average both (from the average alone its losses would differ from step 3).
    # (with an average, the uninterrupted run saves at every step: saving must not disturb training)
    # Muon's momentum buffers and AdamW's moments come back from one optimizer state.
    mode, _, optimizer = mode.partition("-")
    kw = {"train": mode, "seed": 7, "ema_decay": ema, "optimizer": optimizer or "adamw", "muon_lr": 2e-3}
    whole = train(_config(tiny_bundle, data, tmp_path / "a", steps=5, save_every=1 if ema else 0, **kw))
    train(_config(tiny_bundle, data, tmp_path / "b", steps=2, **kw))
    resumed = train(_config(tiny_bundle, data, tmp_path / "b", steps=5, resume=True, **kw))
    assert len(whole.history) == 5 and resumed.history == whole.history  # every loss term, bit for bit
    assert saved_steps(tmp_path / "b") == [2, 5]
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 5 and '"step": 5' in log[-1]


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_trains_weights_in_memory_of_its_own_at_the_allocators_alignment(resume, tiny_bundle, data, tmp_path):
    # The loader leaves CPU weights in the checkpoint's memory map at the file's offsets (13 of the tiny
    # model's 148 tensors 32 bytes off): a fresh and a resumed run held the same weights at different
    # alignments, and CI's CPU rounded a resumed run's load-balancing loss an ulp apart from the fresh one's.
    if resume:
        train(_config(tiny_bundle, data, tmp_path / "o", train="moe", steps=1))
    trainer = prepare(_config(tiny_bundle, data, tmp_path / "o", train="moe", steps=2, resume=resume))
    tensors = list(trainer.transformer.state_dict().items())
    assert len(tensors) > 100
    assert [name for name, t in tensors if t.data_ptr() % 64] == []


def test_a_moving_average_run_saves_the_average_and_trains_the_live_weights(tiny_bundle, data, tmp_path):
    decay, steps = 0.3, 5  # the warm-up's (1 + j) / (10 + j) passes 0.3 at the fourth step: capped from there
    trainer = prepare(_config(tiny_bundle, data, tmp_path / "o", train="moe", steps=steps, lr=1e-2, ema_decay=decay))
    names = {id(p): n for n, p in trainer.transformer.named_parameters()}
    keys = [names[id(p)] for p in trainer.params]
    average = [p.detach().clone() for p in trainer.params]
    for k in range(1, steps + 1):  # diffusers' EMAModel warm-up: 0 at the first step, then (1 + j) / (10 + j)
        trainer.step()
        j = k - 1
        d = 0.0 if j <= 0 else min(decay, (1 + j) / (10 + j))
        average = [d * a + (1 - d) * p.detach() for a, p in zip(average, trainer.params)]
    live = {k: v.clone() for k, v in trainer.transformer.state_dict().items()}
    released = trainer.release_state_dict()
    for key, expected in zip(keys, average):
        torch.testing.assert_close(released[key], expected, rtol=1e-6, atol=1e-7)
    moved = [k for k in keys if not torch.allclose(released[k], live[k], atol=1e-6)]
    assert len(moved) == len(keys)  # the average is not the last weights
    assert all(torch.equal(v, live[k]) for k, v in trainer.transformer.state_dict().items())  # training goes on
    loaded = load_pipeline(tiny_bundle.base, trainer.save(), device="cpu").transformer.state_dict()
    assert all(torch.equal(loaded[k], released[k]) for k in released)


def test_the_seed_decides_the_run(tiny_bundle, data, tmp_path):
    one = train(_config(tiny_bundle, data, tmp_path / "a", steps=2, seed=1)).history
    again = train(_config(tiny_bundle, data, tmp_path / "b", steps=2, seed=1)).history
    other = train(_config(tiny_bundle, data, tmp_path / "c", steps=2, seed=2)).history
    assert one == again and one != other


def test_an_output_with_checkpoints_needs_resume_and_the_same_settings(tiny_bundle, data, tmp_path):
    train(_config(tiny_bundle, data, tmp_path / "o", steps=1))
    steps = []
    with pytest.raises(InputError, match="--resume"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2), progress=steps.append)
    with pytest.raises(InputError, match="resume with the same settings"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, train="lora", resume=True), progress=steps.append)
    # A moving average cannot start half-way: its checkpoint's model would average from the resume point.
    with pytest.raises(InputError, match=r"ema_decay 0.0 \(now 0.9\)"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, resume=True, ema_decay=0.9), progress=steps.append)
    state_file = tmp_path / "o" / "checkpoint-000001" / STATE_FILE  # saved before --ema-decay existed
    state = torch.load(state_file, weights_only=True)
    del state["config"]["ema_decay"]
    torch.save(state, state_file)
    with pytest.raises(InputError, match=r"ema_decay 0.0 \(now 0.9\)"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, resume=True, ema_decay=0.9), progress=steps.append)
    # nor can the optimizer change (a checkpoint saved before --optimizer existed was AdamW's)
    del state["config"]["optimizer"]
    torch.save(state, state_file)
    with pytest.raises(InputError, match=r"optimizer 'adamw' \(now 'muon'\)"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, train="whole", resume=True, optimizer="muon"),
              progress=steps.append)
    assert steps == [] and saved_steps(tmp_path / "o") == [1]


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest(tiny_bundle, data, tmp_path):
    from tagmoe_core.training.muon import MuonWithAdamW

    trainer = prepare(_config(tiny_bundle, data, tmp_path / "o", train="whole", optimizer="muon", lr=1e-3,
                              muon_lr=5e-3))
    optimizer = trainer.optimizer
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in trainer.transformer.named_parameters()}
    muon, adamw = ({names[id(p)] for g in optimizer.param_groups if g["muon"] == flag for p in g["params"]}
                   for flag in (True, False))
    assert not muon & adamw and len(muon | adamw) == len(trainer.params)
    assert {"transformer_blocks.0.attn.to_q.weight", "transformer_blocks.3.attn.to_add_out.weight",
            "transformer_blocks.0.img_mod.1.weight", "transformer_blocks.1.txt_mlp.net.2.weight"} <= muon
    assert all(n.startswith("transformer_blocks.") and n.endswith(".weight") for n in muon)
    assert not any(".router." in n or ".experts." in n for n in muon)
    assert {"img_in.weight", "proj_out.weight", "router_head.net.0.weight",
            "transformer_blocks.2.img_mlp.experts.mlp.w1", "transformer_blocks.2.img_mlp.router.layer.weight",
            "transformer_blocks.0.attn.to_q.bias"} <= adamw
    assert [g["lr"] for g in optimizer.param_groups] == [5e-3, 1e-3]


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_bundle, data, tmp_path):
    def grads(flag: bool):
        trainer = prepare(_config(tiny_bundle, data, tmp_path / f"o{flag}", gradient_checkpointing=flag))
        terms = trainer.losses(*trainer.step_inputs(0))
        terms.total.backward()
        return terms.as_dict(), [p.grad.clone() for p in trainer.params]

    (plain, g_plain), (checkpointed, g_ckpt) = grads(False), grads(True)
    assert plain == pytest.approx(checkpointed, rel=1e-6)
    assert len(g_plain) == len(g_ckpt) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_plain, g_ckpt))
    assert any(float(g.abs().sum()) > 0 for g in g_ckpt[:3])  # the routers get the load-balancing gradient


def test_batches_group_samples_of_one_shape_and_pad_prompts(tiny_bundle, data, tmp_path):
    trainer = prepare(_config(tiny_bundle, data, tmp_path / "o", batch_size=2, text_dropout=0.5))
    plan = trainer.epoch_plan(0)
    assert sorted(i for batch in plan for i in batch) == [0, 1, 2, 3] and trainer.batches_per_epoch == len(plan) == 3
    assert all(len({trainer.samples[i].group for i in batch}) == 1 for batch in plan)
    pair = next(step for step in range(3) if len(trainer.batch_indices(step)) == 2)
    batch, sigma, noise = trainer.step_inputs(pair)
    assert batch.condition.shape == (2, 12, 64) and sigma.shape == (2,) and noise.shape == batch.x0.shape
    report = trainer.step(trainer.step_inputs(pair))
    assert report.terms["loss"] > 0
    dropped = prepare(_config(tiny_bundle, data, tmp_path / "p", text_dropout=1.0))
    assert torch.equal(dropped.step_inputs(0)[0].prompt[0], dropped.empty_prompt)


def test_tagmoe_train_then_edit_with_its_checkpoint(tiny_bundle, data, tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", "--tiny", "--data", str(data), "--output", str(output), "--steps", "2", "--train", "lora",
                 "--lora-modules", "to_q,to_v", "--lambda-align", "0.5", "--device", "cpu", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "step 1/2  loss" in out and "align" in out and "step 2/2" in out and "checkpoint-000002" in out
    from tagmoe_core.tiny import trained_tiny_bundle

    assert main(["edit", "--pretrained_model_path", str(trained_tiny_bundle().base), "--transformer_model_path",
                 str(output / "checkpoint-000002"), "--device", "cpu", "--image", str(data / "0_in.png"),
                 "--prompt", "Make the circle red", "--width", "64", "--height", "48", "--steps", "2", "--seed", "1",
                 "--output", str(tmp_path / "edit.png")]) == 0
    assert (tmp_path / "edit.png").is_file()


@pytest.mark.slow
def test_bf16_storage_with_autocast_and_gradient_checkpointing(tiny_bundle, data, tmp_path):
    """The GPU recipe's dtypes, on the CPU: frozen weights in bf16, trained ones float32, bf16 autocast."""
    result = train(_config(tiny_bundle, data, tmp_path / "o", steps=2, dtype="bf16", gradient_checkpointing=True))
    trainer = result.trainer
    assert trainer.autocast and {p.dtype for p in trainer.params} == {torch.float32}
    assert trainer.transformer.img_in.weight.dtype == torch.bfloat16
    assert len(result.history) == 2 and all(0 < h["flow"] < 10 for h in result.history)
    loaded = load_pipeline(tiny_bundle.base, result.checkpoint, device="cpu")  # mixed dtypes load as one
    assert loaded.transformer.router_head.net[0].weight.dtype == torch.float32


def test_a_training_checkpoint_loads_through_the_diffusers_folder_loader_node(tiny_bundle, data, tmp_path):
    """What a ComfyUI user does with a run's checkpoint: put it in models/tagmoe and load it with the node."""
    from node_harness import load_pack, run_node

    result = train(_config(tiny_bundle, data, tmp_path / "o", steps=2))
    pack = load_pack()
    bridge = pack.nodes.comfy_bridge
    models = tmp_path / "models"
    (models / "diffusers").mkdir(parents=True)
    (models / "tagmoe").mkdir()
    (models / "diffusers" / "Qwen-Image-tiny").symlink_to(tiny_bundle.base)
    (models / "tagmoe" / "my-run").symlink_to(result.checkpoint)
    saved = dict(bridge._fallback_roots)
    try:
        bridge.configure(models)
        assert "my-run/" in bridge.list_tagmoe_weights()
        (handle, _), _ = run_node(pack.NODE_CLASS_MAPPINGS["TagMoEModelLoader"], base_model="Qwen-Image-tiny",
                                  tagmoe_weights="my-run/", device="cpu")
        assert torch.equal(_forward(handle.require().transformer), _forward(result.trainer.transformer.eval()))
        handle.release()
    finally:
        bridge._fallback_roots.clear()
        bridge._fallback_roots.update(saved)


def test_an_output_that_cannot_be_created_is_refused_before_loading(tiny_bundle, data, tmp_path):
    # Found at the first save before, after loading, encoding and training every step: the run was lost.
    (tmp_path / "afile").write_text("not a folder")
    steps = []
    with pytest.raises(InputError, match="cannot be created: .*afile' is a file"):
        train(_config(tiny_bundle, data, tmp_path / "afile" / "sub", steps=1), progress=steps.append)
    assert steps == []


def test_a_resumed_state_or_tag_head_that_does_not_fit_is_one_clear_error(tiny_bundle, data, tmp_path):
    from safetensors.torch import save_file

    from tagmoe_core.errors import CorruptCheckpointError, ShapeMismatchError

    train(_config(tiny_bundle, data, tmp_path / "o", steps=1, train="lora"))
    checkpoint = tmp_path / "o" / "checkpoint-000001"
    weights_file = next((checkpoint / "transformer").glob("*.safetensors"))
    weights = load_file(weights_file)
    rows = weights["tag_embedding.weight"]
    weights["tag_embedding.weight"] = torch.cat([rows, rows[:2]])  # two tags more than the model has
    save_file(weights, str(weights_file))
    steps = []
    expected = r"'tag_embedding.weight' .*the model expects \[\d+, \d+\] but the file has"
    with pytest.raises(ShapeMismatchError, match=expected):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, train="lora", resume=True), progress=steps.append)
    torch.save([1, 2, 3], checkpoint / STATE_FILE)  # not the dictionary training saves
    with pytest.raises(CorruptCheckpointError, match="is not a training state"):
        train(_config(tiny_bundle, data, tmp_path / "o", steps=2, train="lora", resume=True), progress=steps.append)
    assert steps == []


def test_a_checkpoint_that_cannot_be_written_is_one_clear_error(tiny_bundle, data, tmp_path):
    from tagmoe_core.errors import TagMoEError

    output = tmp_path / "o"

    def folder_becomes_a_file(report):  # as a disk that fills or a folder removed during the run
        if output.is_dir():
            output.rmdir()
        output.write_text("in the way")

    with pytest.raises(TagMoEError, match="the checkpoint of step 1 could not be written to"):
        train(_config(tiny_bundle, data, output, steps=1), progress=folder_becomes_a_file)
