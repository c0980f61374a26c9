"""Device specifications ("auto", "cpu", "0", "0,1", "cuda:1", ...) and multi-GPU placement.

``parse_device_spec`` checks the syntax only; ``resolve_devices`` also checks the machine
(CUDA present, ids in range), so both can be tested on a CPU-only machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeviceError

GIB = 1024**3
DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                                         "fp32": torch.float32}
RESERVE_BYTES = 2 * GIB  # the reference keeps 2 GiB free on every GPU
MIN_BUDGET_BYTES = 4 * GIB  # and never plans less than 4 GiB for one


@dataclass(frozen=True)
class DeviceSpec:
    """``kind`` 'cpu', 'cuda' or 'mps'; ``ids`` the CUDA ordinals (several = split across GPUs)."""

    kind: str
    ids: tuple[int, ...] = ()

    @property
    def primary(self) -> torch.device:
        return torch.device(self.kind, self.ids[0]) if self.kind == "cuda" else torch.device(self.kind)

    @property
    def last(self) -> torch.device:
        return torch.device(self.kind, self.ids[-1]) if self.kind == "cuda" else torch.device(self.kind)

    @property
    def is_multi_gpu(self) -> bool:
        return self.kind == "cuda" and len(self.ids) > 1

    @property
    def default_dtype(self) -> torch.dtype:
        """bf16 on GPUs (the release's dtype); fp32 on the CPU, where bf16 matmuls are far slower."""
        return torch.float32 if self.kind == "cpu" else torch.bfloat16

    def __str__(self) -> str:
        if self.kind != "cuda":
            return self.kind
        return ",".join(f"cuda:{i}" for i in self.ids)


def parse_device_spec(spec: str | int | None) -> DeviceSpec | None:
    """Syntax only. ``None`` means "auto" (decided by :func:`resolve_devices`)."""
    if spec is None:
        return None
    text = str(spec).strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("cpu", "-1"):
        return DeviceSpec("cpu")
    if text == "mps":
        return DeviceSpec("mps")
    if text == "cuda":
        return DeviceSpec("cuda", (0,))
    ids: list[int] = []
    for part in text.split(","):
        token = part.strip().removeprefix("cuda:").removeprefix("cuda")
        if not token.isdigit():
            raise DeviceError(
                f"invalid device {spec!r}: use 'auto', 'cpu', a GPU number such as '0' or 'cuda:0', "
                "or a comma-separated list such as '0,1' to split the model across GPUs")
        ids.append(int(token))
    if len(set(ids)) != len(ids):
        twice = sorted(i for i in ids if ids.count(i) > 1)[0]
        raise DeviceError(f"invalid device {spec!r}: GPU {twice} is listed twice")
    return DeviceSpec("cuda", tuple(ids))


def resolve_devices(spec: str | int | None, cuda_count: int | None = None, mps: bool | None = None) -> DeviceSpec:
    """Parse ``spec`` and check it against this machine (or the given ``cuda_count``)."""
    parsed = parse_device_spec(spec)
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if mps is None:
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if parsed is None:
        if count > 0:
            return DeviceSpec("cuda", (0,))
        return DeviceSpec("mps") if mps else DeviceSpec("cpu")
    if parsed.kind == "mps" and not mps:
        raise DeviceError("device 'mps' was asked for but Apple's Metal backend is not available here; use 'cpu'")
    if parsed.kind == "cuda":
        if count == 0:
            raise DeviceError(
                f"device '{spec}' needs CUDA, but no CUDA GPU is available "
                f"(torch {torch.__version__}{' built without CUDA' if torch.version.cuda is None else ''}); "
                "use 'cpu' or 'auto'")
        bad = [i for i in parsed.ids if i >= count]
        if bad:
            raise DeviceError(f"GPU {bad[0]} does not exist: this machine has {count} GPU(s), "
                              f"numbered 0-{count - 1}")
    return parsed


def gpu_budgets(ids: tuple[int, ...], free_bytes: Mapping[int, int] | None = None,
                caps: Mapping[int, int] | None = None, reserve: int = RESERVE_BYTES) -> dict[int, int]:
    """Bytes the transformer may use on each GPU: free memory minus ``reserve`` (at least
    4 GiB, as the reference), lowered to a user's ``caps`` where given."""
    budgets: dict[int, int] = {}
    for i in ids:
        free = free_bytes[i] if free_bytes is not None else torch.cuda.mem_get_info(i)[0]
        budget = max(free - reserve, MIN_BUDGET_BYTES)
        if caps and i in caps:
            budget = min(budget, caps[i])
        budgets[i] = budget
    return budgets


def plan_transformer_split(transformer: nn.Module, budgets: Mapping[int, int],
                           dtype: torch.dtype | None = None) -> dict[str, int]:
    """accelerate's device map over whole ``QwenImageTransformerBlock``s within ``budgets``.

    Works on a meta-device model, so it is planned before any weight is read. Raises a
    :class:`DeviceError` when the budgets cannot hold the transformer.
    """
    from accelerate import infer_auto_device_map

    device_map = infer_auto_device_map(
        transformer, max_memory=dict(budgets), no_split_module_classes=["QwenImageTransformerBlock"],
        dtype=dtype)
    spill = sorted({str(d) for d in device_map.values() if not isinstance(d, int)})
    if spill:
        need = sum(p.numel() * (dtype.itemsize if dtype else p.element_size()) for p in transformer.parameters())
        have = sum(budgets.values())
        raise DeviceError(
            f"the transformer ({need / GIB:.1f} GiB) does not fit on GPU(s) {', '.join(map(str, budgets))} "
            f"({have / GIB:.1f} GiB usable): parts would go to {', '.join(spill)}. Add GPUs or free memory.")
    return device_map


def device_for_key(key: str, device_map: Mapping[str, int | str | torch.device]) -> torch.device:
    """Device of parameter ``key`` under an accelerate-style ``device_map`` (longest prefix)."""
    best, best_len = None, -1
    for prefix, device in device_map.items():
        if (prefix == "" or key == prefix or key.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = device, len(prefix)
    if best is None:
        raise KeyError(key)
    return torch.device("cuda", best) if isinstance(best, int) else torch.device(best)


def module_device(module: torch.nn.Module) -> torch.device:
    device_map = getattr(module, "hf_device_map", None)
    if device_map:
        for device in device_map.values():
            if device not in ("cpu", "disk"):
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return next(module.parameters()).device
