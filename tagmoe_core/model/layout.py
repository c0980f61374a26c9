"""What a TAG-MoE checkpoint holds, read from its keys and shapes alone (no weights, no diffusers):
which blocks are MoE and how big, the transformer's dimensions, and its config when one is beside it.

Two key layouts of the MoE layers exist: the release's (MegaBlocks ``dMoE``:
``img_mlp.router.layer.weight``, ``img_mlp.experts.mlp.w1/w2``, ``img_mlp.experts.bias``) and
the per-expert Linear one of the ComfyUI path (``img_mlp.router.weight``,
``img_mlp.experts.{e}.w1/w2.weight``, see ``expert_layout``); both are recognised here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, NotATagMoECheckpointError, ShapeMismatchError
from .checkpoint import CheckpointReader, WeightFiles
from .moe import MoESpec

log = logging.getLogger("tagmoe")

ROUTER_KEY = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.router\.layer\.weight$")
LINEAR_ROUTER_KEY = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.router\.weight$")
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")
# Modules the release carries for training and routing analysis; inference runs without them.
OPTIONAL_PREFIXES = ("tag_embedding.", "router_head.")
# Wrappers some tools put around a transformer state dict (only stripped when every key has it).
KEY_PREFIXES = ("model.diffusion_model.", "transformer.", "module.")
RELEASE_MOE_BLOCKS = 10
RELEASE_ROPE_AXES = (16, 56, 56)  # Qwen-Image's rotary split of its 128-dim heads (frame, height, width)


def read_transformer_config(base: str | os.PathLike | None, tagmoe_files: WeightFiles | None = None,
                            revision: str | None = None, local_files_only: bool = False) -> dict[str, Any]:
    """The Qwen-Image transformer config: from the base model (``transformer/config.json``),
    else from a ``config.json`` beside the TAG-MoE weights."""
    candidates: list[Path] = []
    if base is not None:
        root = Path(os.path.expanduser(str(base)))
        if root.is_dir():
            candidates += [root / "transformer" / "config.json", root / "config.json"]
        elif not root.exists():
            try:
                from huggingface_hub import hf_hub_download

                candidates.append(Path(hf_hub_download(str(base), "config.json", subfolder="transformer",
                                                       revision=revision, local_files_only=local_files_only)))
            except Exception as exc:  # noqa: BLE001 - reported below with the other places tried
                log.debug("no hub config for %s: %s", base, exc)
    if tagmoe_files is not None:
        candidates += [tagmoe_files.root / "config.json", tagmoe_files.root / "transformer" / "config.json"]
    for path in candidates:
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as exc:
                raise CorruptCheckpointError(f"transformer config '{path}' is not valid JSON: {exc}") from exc
            if config.get("_class_name", "QwenImageTransformer2DModel") not in ("QwenImageTransformer2DModel",):
                log.warning("config %s is for %s; reading it as a QwenImageTransformer2DModel config",
                            path, config.get("_class_name"))
            return config
    raise CheckpointNotFoundError(
        "no Qwen-Image transformer config found: give the base Qwen-Image folder (with "
        f"transformer/config.json). Looked in: {', '.join(str(p) for p in candidates) or 'nowhere'}")


def infer_moe_layout(reader: CheckpointReader, num_layers: int, top_k: int = 1) -> tuple[MoESpec, list[int]]:
    """MoE blocks, expert count and FFN size from the checkpoint's router and expert tensors
    (release layout, or the per-expert Linear layout)."""
    linear = uses_linear_experts(reader.keys())
    router_key = LINEAR_ROUTER_KEY if linear else ROUTER_KEY
    blocks = sorted(int(m.group(1)) for key in reader.keys() if (m := router_key.match(key)))
    if not blocks:
        first = max(0, num_layers - RELEASE_MOE_BLOCKS)
        raise NotATagMoECheckpointError(
            f"no MoE expert weights found for blocks {first}-{num_layers - 1} in {reader.describe()}: "
            "this looks like a dense Qwen-Image transformer, not TAG-MoE weights. Choose the TAG-MoE "
            "checkpoint (e.g. YUXU915/TAG-MoE) as the TAG-MoE weights and the Qwen-Image folder as the base.")
    bad = [b for b in blocks if b >= num_layers]
    if bad:
        raise ShapeMismatchError(f"transformer_blocks.{bad[0]}.img_mlp", (num_layers,), (bad[0] + 1,),
                                 reader.describe())
    prefix = f"transformer_blocks.{blocks[0]}.img_mlp"
    num_experts = reader.infos[f"{prefix}.router{'' if linear else '.layer'}.weight"].shape[0]
    if linear:
        w1 = reader.infos.get(f"{prefix}.experts.0.w1.weight")
        ffn = w1.shape[0] if w1 is not None else None
    else:
        w1 = reader.infos.get(f"{prefix}.experts.mlp.w1")
        ffn = w1.shape[0] // num_experts if w1 is not None else None
    spec = MoESpec(num_experts=num_experts, top_k=min(top_k, num_experts), num_moe_blocks=len(blocks),
                   ffn_hidden_size=ffn)
    return spec, blocks


def strip_wrapper_prefix(reader: CheckpointReader) -> None:
    keys = list(reader.infos)
    for prefix in KEY_PREFIXES:
        if keys and all(k.startswith(prefix) for k in keys):
            reader.infos = {k[len(prefix):]: v for k, v in reader.infos.items()}
            reader.stored_names = {k[len(prefix):]: k for k in keys}
            return


def uses_linear_experts(keys: Iterable[str]) -> bool:
    """True for the per-expert Linear layout (what ComfyUI saves of a TAG-MoE MODEL)."""
    return any(LINEAR_ROUTER_KEY.match(k) for k in keys)


def count_layers(keys: Iterable[str]) -> int:
    indices = {int(m.group(1)) for k in keys if (m := _BLOCK_KEY.match(k))}
    return max(indices) + 1 if indices else 0


def transformer_dims(reader: CheckpointReader, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Qwen-Image transformer dimensions (diffusers config names) read off the tensor shapes.

    ``axes_dims_rope`` (how each head's rotary dims split over frame/height/width) is not in the
    weights: it comes from ``config`` when given, else Qwen-Image's (16, 56, 56) for 128-dim heads.
    """
    def shape(key: str) -> tuple[int, ...]:
        info = reader.infos.get(key)
        if info is None:
            raise NotATagMoECheckpointError(f"{reader.describe()} has no '{key}': it is not a Qwen-Image / TAG-MoE "
                                            "transformer checkpoint")
        return info.shape

    inner, in_channels = shape("img_in.weight")
    head_dim = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    dims: dict[str, Any] = {
        "patch_size": 2,
        "in_channels": in_channels,
        "out_channels": shape("proj_out.weight")[0] // 4,
        "num_layers": count_layers(reader.keys()),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shape("txt_norm.weight")[0],
        "guidance_embeds": False,
    }
    axes = (config or {}).get("axes_dims_rope")
    if axes is None:
        if head_dim != sum(RELEASE_ROPE_AXES):
            raise CheckpointNotFoundError(
                f"{reader.describe()} has {head_dim}-dim attention heads, not Qwen-Image's 128, and no config.json "
                "saying how their rotary dimensions split (axes_dims_rope): put the transformer's config.json beside "
                "it, or write the file with 'tagmoe convert', which records it")
        axes = RELEASE_ROPE_AXES
    if sum(axes) != head_dim:
        raise ShapeMismatchError("axes_dims_rope", (head_dim,), (sum(axes),), reader.describe())
    dims["axes_dims_rope"] = tuple(int(a) for a in axes)
    for key in ("patch_size", "in_channels", "num_layers", "attention_head_dim", "joint_attention_dim"):
        if config and key in config and int(config[key]) != dims[key]:
            log.warning("config says %s=%s but the weights have %s; using the weights'", key, config[key], dims[key])
    return dims
