"""LoRA files on the TAG-MoE MODEL, with a report of what could not be applied (part of the door
to ComfyUI). ComfyUI's own loader applies them the same way; it only logs the keys it skips."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import comfy.lora
import comfy.lora_convert
import comfy.sd
import comfy.utils

from ..tagmoe_core.model.lora_keys import lora_stem

# The dense FFN of a block, in dotted (diffusers) and underscored (kohya: lora_unet_...) key names.
_DENSE_FFN = re.compile(r"transformer_blocks[._](\d+)[._]img_mlp[._]net[._]")


@dataclass
class LoraReport:
    applied: int
    not_applied: list[str] = field(default_factory=list)
    num_experts: int = 4

    def text(self) -> str:
        lines = [f"applied to {self.applied} layers"]
        if self.not_applied:
            dense = [k for k in self.not_applied if _DENSE_FFN.search(k)]
            blocks = sorted({int(_DENSE_FFN.search(k).group(1)) for k in dense})
            if dense:
                lines.append(f"not applied: {len(dense)} keys for the dense FFN of blocks {blocks} (TAG-MoE replaces "
                             f"it there with {self.num_experts} experts; a Qwen-Image LoRA has no weights for them):")
                lines += [f"  {k}" for k in dense]
            other = [k for k in self.not_applied if k not in dense]
            if other:
                lines.append(f"not applied: {len(other)} keys that match no layer of this model:")
                lines += [f"  {k}" for k in other]
        return "\n".join(lines)


def _stems(keys) -> set[str]:
    return {lora_stem(k) for k in keys}


def apply_lora(model, path: str, strength: float):
    """``(patched MODEL, LoraReport)``: ComfyUI's own LoRA loading, plus the names it could not place."""
    lora = comfy.utils.load_torch_file(path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    stems = _stems(comfy.lora_convert.convert_lora(dict(lora)).keys())
    not_applied = sorted(s for s in stems if s not in key_map)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    experts = {getattr(m, "num_experts", None) for m in model.model.diffusion_model.modules()} - {None}
    return patched, LoraReport(len(stems) - len(not_applied), not_applied, max(experts, default=4))
