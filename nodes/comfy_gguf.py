"""TAG-MoE ``.gguf`` weights in ComfyUI's native model: Linears that keep their GGML-quantized weights.

Part of the door to ComfyUI (only ``nodes/comfy_*.py`` import it). The way city96/ComfyUI-GGUF runs
GGUF models, through ComfyUI's own extension points:

* :func:`operations` is an ``operations`` class (ComfyUI's ``manual_cast`` with another ``Linear``) for
  the loader's ``custom_operations``. Its Linear is built empty; loading gives it the file's tensor: a
  quantized one is kept as its raw bytes (a uint8 parameter, so the patcher's size, partial loading and
  offloading count and move the quantized bytes) with its GGML type and shape; a float one (F32 router,
  BF16 projections) as it is. At forward the weight is moved to the input's device and dequantized there
  (``tagmoe_core.model.gguf_dequant``, pure torch) into the compute dtype; LoRA patches are applied to
  the dequantized weight: ComfyUI's own per-forward ``weight_function`` s when the layer is cast on
  forward (partial loading), the patcher's patches otherwise (below).
* :func:`new_patcher` subclasses the patcher ComfyUI's loader uses: when it would bake a LoRA into a
  fully loaded weight (``patch_weight_to_device``), a quantized Linear keeps the patches and applies
  them at each forward instead (a quantized weight cannot take them in place); unpatching drops them.
  Dynamic VRAM is not used for GGUF: the classic patcher's partial loading moves the quantized bytes.
"""

from __future__ import annotations

import functools

import comfy.lora
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.utils
import torch

from ..tagmoe_core.model.gguf_dequant import TYPES, dequantize
from ..tagmoe_core.model.gguf_reader import quantized_of


def _to(item, device):
    """LoRA patch data (tensors in tuples and lists) on ``device``."""
    if isinstance(item, torch.Tensor):
        return item.to(device, non_blocking=True)
    if isinstance(item, tuple):
        return tuple(_to(x, device) for x in item)
    if isinstance(item, list):
        return [_to(x, device) for x in item]
    return item


class GGUFLinear(comfy.ops.manual_cast.Linear):
    """A Linear whose weight may be GGML-quantized bytes, dequantized on the input's device at forward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        torch.nn.Module.__init__(self)  # no allocation: the weight comes from the file, in the file's format
        self.in_features, self.out_features = in_features, out_features
        self.weight = None
        self.bias = None
        self.ggml_type: str | None = None  # the weight's GGML type when it is quantized
        self.ggml_shape: tuple[int, ...] | None = None
        self.gguf_patches: list = []  # (LoRA patches, key), set by the patcher of new_patcher

    @property
    def quantized(self) -> bool:
        return self.ggml_type is not None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for key, value in state_dict.items():
            name = key[len(prefix):] if key.startswith(prefix) else None
            if name not in ("weight", "bias"):
                if name is not None:
                    unexpected_keys.append(key)
                continue
            info = quantized_of(value)
            if name == "weight":
                if info is not None and (info.shape[-1], info.shape[0]) != (self.in_features, self.out_features):
                    error_msgs.append(f"{key}: {list(info.shape)}, not [{self.out_features}, {self.in_features}]")
                    continue
                self.ggml_type = info.qtype.name if info is not None else None
                self.ggml_shape = tuple(info.shape) if info is not None else None
            # copied out of the file's read-only memory map: ComfyUI may write weights in place
            setattr(self, name, torch.nn.Parameter(value.clone(), requires_grad=False))
        if self.weight is None and prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")

    def forward(self, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.quantized:
            return super().forward(input, *args, **kwargs)
        weight, bias = self.dequantized(input.device, input.dtype)
        return torch.nn.functional.linear(input, weight, bias)

    def dequantized(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) on ``device`` in ``dtype``, LoRA patches applied to the dequantized weight."""
        non_blocking = mm.device_supports_non_blocking(device)
        raw = self.weight.to(device, non_blocking=non_blocking)
        weight = dequantize(raw, TYPES[self.ggml_type], self.ggml_shape, torch.float32)
        for patches, key in self.gguf_patches:
            weight = comfy.lora.calculate_weight(_to(patches, device), weight, key)
        weight = weight.to(dtype)
        for function in self.weight_function:  # ComfyUI's LowVramPatch: LoRA under cast-on-forward
            weight = function(weight)
        bias = None
        if self.bias is not None:
            bias = mm.cast_to(self.bias, dtype, device, non_blocking=non_blocking, copy=bool(self.bias_function))
            for function in self.bias_function:
                bias = function(bias)
        return weight, bias


SAVE_REFUSED = ("saving a TAG-MoE model loaded from a quantized .gguf is not supported (its Linears hold "
                "GGML-quantized bytes, not weights a checkpoint can take): keep the .gguf, or save the model loaded "
                "from the .safetensors weights")


def refuse_saving_quantized(model: torch.nn.Module) -> None:
    """One line instead of a file of raw GGML bytes that no loader reads (a float .gguf saves as any model)."""
    if any(isinstance(m, GGUFLinear) and m.quantized for m in model.modules()):
        raise RuntimeError(SAVE_REFUSED)


def operations(base: type = comfy.ops.manual_cast) -> type:
    """ComfyUI's ``base`` operations with :class:`GGUFLinear` as their Linear."""

    class GGUFOps(base):
        class Linear(GGUFLinear):
            pass

    return GGUFOps


class _KeepsPatches:
    """Mixed into the patcher: LoRA on a quantized Linear is applied at forward, never baked in."""

    def _quantized_linear(self, key: str) -> GGUFLinear | None:
        owner, _, name = key.rpartition(".")
        module = comfy.utils.get_attr(self.model, owner) if owner else None
        return module if isinstance(module, GGUFLinear) and module.quantized and name == "weight" else None

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False, **newer):
        """Newer ComfyUI also passes ``return_weight`` (the patched weight returned, nothing set: what its
        saving reads) and ``force_cast`` (its dynamic VRAM, not used for GGUF); they reach ComfyUI's own method
        only when given, so older ComfyUI, whose method has neither, is called as before. A quantized Linear
        has no stored weight of a float dtype to return: refused in one line."""
        module = self._quantized_linear(key)
        if module is None:
            if return_weight:
                newer["return_weight"] = True
            return super().patch_weight_to_device(key, device_to, inplace_update, **newer)
        if return_weight:  # ComfyUI wants the patched weight in the stored tensor's shape and dtype: raw bytes here
            raise RuntimeError(SAVE_REFUSED)
        if key in self.patches:
            module.gguf_patches = [(_to(self.patches[key], device_to) if device_to is not None else self.patches[key],
                                    key)]

    def model_state_dict_for_saving(self, *args, **kwargs):
        """Newest ComfyUI's saving (ModelSave, CheckpointSave) reads the weights here: refused for quantized ones."""
        refuse_saving_quantized(self.model)
        return super().model_state_dict_for_saving(*args, **kwargs)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for module in self.model.modules():
                if isinstance(module, GGUFLinear):
                    module.gguf_patches = []
        return super().unpatch_model(device_to, unpatch_weights)


@functools.cache
def patcher_class(base: type) -> type:
    return type(f"TagMoEGGUF{base.__name__}", (_KeepsPatches, base), {})


def weights_loaded(patcher) -> None:
    """Once the weights are in: the patcher counts its size again (it may have counted before loading, when
    these Linears held nothing), now the quantized bytes."""
    if isinstance(getattr(patcher, "size", None), int):
        patcher.size = 0


def describe(model: torch.nn.Module) -> str:
    """The GGML types of the model's Linears, as a summary line."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, GGUFLinear) and module.weight is not None:
            name = module.ggml_type or str(module.weight.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + 1
    types = ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
    return f"GGUF Linears: {types}; quantized ones dequantized on their device at each forward"
