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

from ..errors import (CheckpointNotFoundError, CorruptCheckpointError, InconsistentExpertsError,
                      NotATagMoECheckpointError, ShapeMismatchError)
from .checkpoint import CheckpointReader, WeightFiles, looks_like_repo_id
from .moe import MoESpec

log = logging.getLogger("tagmoe")

ROUTER_KEY = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.router\.layer\.weight$")
LINEAR_ROUTER_KEY = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.router\.weight$")
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.")
_EXPERT_KEY = re.compile(r"^transformer_blocks\.(\d+)\.img_mlp\.experts\.(?:(\d+)\.)?")
_LINEAR_EXPERT_KEY = re.compile(r"^(transformer_blocks\.\d+\.img_mlp)\.experts\.(\d+)\.(w1|w2)\.weight$")
_DENSE_FFN_KEY = re.compile(r"^transformer_blocks\.\d+\.(?:txt|img)_mlp\.net\.0\.proj\.weight$")
# Modules the release carries for training and routing analysis; inference runs without them.
OPTIONAL_PREFIXES = ("tag_embedding.", "router_head.")
# Wrappers some tools put around a transformer state dict (only stripped when every key has it).
KEY_PREFIXES = ("model.diffusion_model.", "transformer.", "module.")
RELEASE_MOE_BLOCKS = 10
METADATA_KEY = "tagmoe_config"  # what ``tagmoe convert`` writes into the safetensors header
RELEASE_ROPE_AXES = (16, 56, 56)  # Qwen-Image's rotary split of its 128-dim heads (frame, height, width)


def checkpoint_config(files: WeightFiles) -> dict[str, Any] | None:
    """The transformer config that travels with the weights: ``config.json`` beside them (or in a
    ``transformer/`` subfolder), else the one ``tagmoe convert`` stored in a safetensors or GGUF header."""
    for path in (files.root / "config.json", files.root / "transformer" / "config.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                log.warning("ignoring %s: not valid JSON", path)
    for path in files.files:
        if path.name.endswith(".gguf"):
            from .gguf_reader import GGUFFile

            config = GGUFFile.open(path).config()
            if config is not None:
                return config
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
            if text:
                return json.loads(text)
    return None


def read_transformer_config(base: str | os.PathLike | None, tagmoe_files: WeightFiles | None = None,
                            revision: str | None = None, local_files_only: bool = False) -> dict[str, Any]:
    """The Qwen-Image transformer config: from the base model (``transformer/config.json``),
    else from a ``config.json`` beside the TAG-MoE weights."""
    candidates: list[Path] = []
    if base is not None:
        root = Path(os.path.expanduser(str(base)))
        if root.is_dir():
            candidates += [root / "transformer" / "config.json", root / "config.json"]
        elif looks_like_repo_id(base):  # a missing local path is not sent to the hub
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
    stored = checkpoint_config(tagmoe_files) if tagmoe_files is not None else None
    if stored is not None:  # a file written by 'tagmoe convert' carries its config
        return stored
    raise CheckpointNotFoundError(
        "no Qwen-Image transformer config found: give the base Qwen-Image folder (with "
        f"transformer/config.json). Looked in: {', '.join(str(p) for p in candidates) or 'nowhere'}")


def infer_moe_layout(reader: CheckpointReader, num_layers: int, top_k: int = 1) -> tuple[MoESpec, list[int]]:
    """MoE blocks, expert count and FFN size from the checkpoint's router and expert tensors
    (release layout, or the per-expert Linear layout), checked against each other in every block
    before any weight is read."""
    linear = uses_linear_experts(reader.keys())
    router_key = LINEAR_ROUTER_KEY if linear else ROUTER_KEY
    blocks = sorted(int(m.group(1)) for key in reader.keys() if (m := router_key.match(key)))
    experts = [m for key in reader.keys() if (m := _EXPERT_KEY.match(key))]
    unrouted = sorted({int(m.group(1)) for m in experts} - set(blocks))
    if unrouted:
        router = "router.weight" if linear or any(m.group(2) is not None for m in experts) else "router.layer.weight"
        has = "has" if len(unrouted) == 1 else "have"
        raise InconsistentExpertsError(
            f"{_span('block', unrouted)} {has} expert weights but no {router} in {reader.describe()}: the file "
            "is incomplete (or its routers were saved under other names); use the complete TAG-MoE checkpoint")
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
    check = _check_linear_experts if linear else _check_release_experts
    found = {block: check(reader, f"transformer_blocks.{block}.img_mlp", _dense_ffn_size(reader)) for block in blocks}
    num_experts, ffn = found[blocks[0]]
    for block in blocks[1:]:
        if found[block][0] != num_experts:
            raise InconsistentExpertsError(
                f"the MoE blocks of {reader.describe()} disagree: block {blocks[0]} has {num_experts} experts but "
                f"block {block} has {found[block][0]}; every MoE block must have the same experts")
        ffn = ffn or found[block][1]
    spec = MoESpec(num_experts=num_experts, top_k=min(top_k, num_experts), num_moe_blocks=len(blocks),
                   ffn_hidden_size=ffn)
    return spec, blocks


def _span(word: str, indices: list[int]) -> str:
    if len(indices) == 1:
        return f"{word} {indices[0]}"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{word}s {indices[0]}-{indices[-1]}"
    return f"{word}s {', '.join(map(str, indices))}"


def _dense_ffn_size(reader: CheckpointReader) -> int | None:
    """The FFN size of the transformer's dense FFNs (the text stream's stay dense), when the file has one.
    TAG-MoE's experts are upcycled from them: same size."""
    for key, info in reader.infos.items():
        if _DENSE_FFN_KEY.match(key) and len(info.shape) == 2:
            return info.shape[0]
    return None


def _router(reader: CheckpointReader, key: str) -> tuple[int, int]:
    shape = reader.infos[key].shape
    if len(shape) != 2 or shape[0] == 0:
        raise InconsistentExpertsError(
            f"'{key}' in {reader.describe()} has shape {list(shape)}: a router over no experts (it must be "
            "[experts, hidden]); the file is damaged or not TAG-MoE weights")
    return shape[0], shape[1]


def _check_release_experts(reader: CheckpointReader, prefix: str, dense_ffn: int | None) -> tuple[int, int | None]:
    """(experts, FFN size) of one MegaBlocks-layout MoE block: router [E, H], w1 = w2 = [E x F, H]."""
    num_experts, hidden = _router(reader, f"{prefix}.router.layer.weight")
    ffn = dense_ffn or 4 * hidden  # Qwen-Image's FFN size, when the file has no dense FFN to tell it
    shapes = {w: reader.infos[f"{prefix}.experts.mlp.{w}"].shape for w in ("w1", "w2")
              if f"{prefix}.experts.mlp.{w}" in reader.infos}
    if len(shapes) == 2 and shapes["w1"] != shapes["w2"]:
        raise InconsistentExpertsError(
            f"{prefix} in {reader.describe()}: experts.mlp.w1 is {list(shapes['w1'])} but experts.mlp.w2 is "
            f"{list(shapes['w2'])}; both must be [experts x FFN size, hidden]")
    for w, shape in shapes.items():
        if tuple(shape) != (num_experts * ffn, hidden):
            held = f" ({shape[0] // ffn} experts)" if len(shape) == 2 and shape[0] % ffn == 0 else ""
            raise InconsistentExpertsError(
                f"{prefix} in {reader.describe()}: its router is {[num_experts, hidden]} ({num_experts} experts), "
                f"so experts.mlp.{w} should be {[num_experts * ffn, hidden]} ({num_experts} x FFN size {ffn}), "
                f"but it is {list(shape)}{held}: router and expert weights do not belong together")
    return num_experts, ffn if shapes else None


def _check_linear_experts(reader: CheckpointReader, prefix: str, dense_ffn: int | None) -> tuple[int, int | None]:
    """(experts, FFN size) of one per-expert Linear MoE block: router [E, H], experts 0..E-1 with
    w1 [F, H] and w2 [H, F]."""
    num_experts, hidden = _router(reader, f"{prefix}.router.weight")
    ffn = dense_ffn or 4 * hidden
    weights = {(int(m.group(2)), m.group(3)): key for key in reader.keys()
               if (m := _LINEAR_EXPERT_KEY.match(key)) and m.group(1) == prefix}
    indices = sorted({e for e, _ in weights})
    if indices and indices != list(range(num_experts)):
        raise InconsistentExpertsError(
            f"{prefix} in {reader.describe()}: its router is {[num_experts, hidden]} ({num_experts} experts) but "
            f"the file has weights for {_span('expert', indices)}: router and expert weights do not belong together")
    for (_, w), key in sorted(weights.items()):
        want = (ffn, hidden) if w == "w1" else (hidden, ffn)
        shape = reader.infos[key].shape
        if tuple(shape) != want:
            raise InconsistentExpertsError(
                f"'{key}' in {reader.describe()} is {list(shape)}, not {list(want)} (FFN size {ffn}, hidden "
                f"{hidden} from the router {[num_experts, hidden]}): the experts do not fit their router")
    return num_experts, ffn if weights else None


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
