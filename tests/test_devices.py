"""Device specifications and multi-GPU planning (planned on the meta device, no GPU needed)."""

from __future__ import annotations

import json

import pytest
import torch

from tagmoe_core.errors import DeviceError
from tagmoe_core.model.moe import MoESpec
from tagmoe_core.model.transformer import build_tagmoe_transformer
from tagmoe_core.runtime.devices import (
    GIB,
    DeviceSpec,
    device_for_key,
    gpu_budgets,
    parse_device_spec,
    plan_transformer_split,
    resolve_devices,
)


@pytest.mark.parametrize("spec, kind, ids", [
    ("cpu", "cpu", ()), ("-1", "cpu", ()), (" CPU ", "cpu", ()), ("0", "cuda", (0,)), ("cuda", "cuda", (0,)),
    ("cuda:1", "cuda", (1,)), ("0,1", "cuda", (0, 1)), ("cuda:0, cuda:2", "cuda", (0, 2)), (3, "cuda", (3,)),
    ("mps", "mps", ()),
])
def test_parse(spec, kind, ids):
    assert parse_device_spec(spec) == DeviceSpec(kind, ids)


@pytest.mark.parametrize("spec", [None, "", "auto", "AUTO"])
def test_auto(spec):
    assert parse_device_spec(spec) is None
    assert resolve_devices(spec, cuda_count=0, mps=False) == DeviceSpec("cpu")
    assert resolve_devices(spec, cuda_count=2, mps=False) == DeviceSpec("cuda", (0,))


@pytest.mark.parametrize("spec, message", [
    ("gpu", "invalid device"), ("0,,1", "invalid device"), ("cuda:x", "invalid device"), ("1,1", "listed twice"),
    ("-2", "invalid device"),
])
def test_syntax_errors(spec, message):
    with pytest.raises(DeviceError, match=message):
        parse_device_spec(spec)


def test_machine_checks():
    with pytest.raises(DeviceError, match="no CUDA GPU is available"):
        resolve_devices("0", cuda_count=0)
    with pytest.raises(DeviceError, match="GPU 2 does not exist: this machine has 2 GPU"):
        resolve_devices("0,2", cuda_count=2)
    with pytest.raises(DeviceError, match="Metal"):
        resolve_devices("mps", cuda_count=0, mps=False)
    spec = resolve_devices("1,0", cuda_count=2)
    assert spec.is_multi_gpu and spec.primary == torch.device("cuda", 1) and spec.last == torch.device("cuda", 0)
    assert str(spec) == "cuda:1,cuda:0" and spec.default_dtype == torch.bfloat16
    assert DeviceSpec("cpu").default_dtype == torch.float32


def test_budgets_keep_two_gib_and_at_least_four():
    free = {0: 40 * GIB, 1: 5 * GIB}
    assert gpu_budgets((0, 1), free) == {0: 38 * GIB, 1: 4 * GIB}
    assert gpu_budgets((0, 1), free, caps={0: 10 * GIB}) == {0: 10 * GIB, 1: 4 * GIB}


def test_split_is_at_whole_blocks(tiny_bundle):
    config = json.loads((tiny_bundle.base / "transformer" / "config.json").read_text())
    model = build_tagmoe_transformer(config, MoESpec(num_moe_blocks=2), device="meta")
    block_bytes = sum(p.numel() * 4 for p in model.transformer_blocks[0].parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    plan = plan_transformer_split(model, {0: total // 2 + block_bytes, 1: total}, torch.float32)
    assert set(plan.values()) == {0, 1}
    for key, device in plan.items():  # a block is placed whole: no key below block level
        if key.startswith("transformer_blocks"):
            assert key.count(".") == 1, key
    for name, _ in model.named_parameters():
        assert device_for_key(name, plan).type == "cuda"
    with pytest.raises(DeviceError, match="does not fit"):
        plan_transformer_split(model, {0: block_bytes, 1: block_bytes}, torch.float32)


def test_device_for_key_uses_the_longest_prefix():
    plan = {"": "cpu", "transformer_blocks.1": 1, "transformer_blocks.10": 0}
    assert device_for_key("transformer_blocks.1.attn.to_q.weight", plan) == torch.device("cuda", 1)
    assert device_for_key("transformer_blocks.10.attn.to_q.weight", plan) == torch.device("cuda", 0)
    assert device_for_key("img_in.weight", plan) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_multi_gpu_pipeline_runs(tiny_bundle, photo):
    from tagmoe_core.pipeline.builder import load_pipeline

    pipe = load_pipeline(tiny_bundle.base, tiny_bundle.tagmoe, device="0,1")
    out = pipe.edit(photo, "Change the cloak to red color", width=32, height=32, steps=2, seed=0)
    assert out.images[0].size == (32, 32)
