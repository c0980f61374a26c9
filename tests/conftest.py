"""Shared fixtures: the embedded tiny model, built once per test session with the real classes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny TAG-MoE bundle, built into a fresh cache that ``--tiny`` runs also find."""
    cache = tmp_path_factory.mktemp("tagmoe-cache")
    os.environ["TAGMOE_CACHE"] = str(cache)
    from tagmoe_core.tiny import ensure_tiny_bundle

    return ensure_tiny_bundle()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_bundle):
    from tagmoe_core.pipeline.builder import load_pipeline

    return load_pipeline(tiny_bundle.base, tiny_bundle.tagmoe, device="cpu")


@pytest.fixture
def photo():
    """A small RGB test picture with structure (not flat), 72x40."""
    rng = np.random.RandomState(0)
    y, x = np.mgrid[0:40, 0:72]
    base = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1) % 256
    noise = rng.randint(0, 40, size=base.shape)
    return Image.fromarray(((base + noise) % 256).astype("uint8"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def comfy_server(tiny_bundle, tmp_path_factory):
    """A real ComfyUI (``COMFYUI_DIR``) serving the pack and the tiny model (see comfy_server.py)."""
    from comfy_server import COMFYUI_DIR, start_server

    if not COMFYUI_DIR:
        pytest.skip("set COMFYUI_DIR to a ComfyUI checkout")
    yield from start_server(tiny_bundle, tmp_path_factory)
