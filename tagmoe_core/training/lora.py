"""Low-rank adapters on chosen ``nn.Linear`` modules, without changing the model's modules or keys.

Each chosen Linear ``W`` gets ``A`` [r, in] (Kaiming-uniform, as LoRA starts) and ``B`` [out, r]
(zeros: training starts from the model as it is); a forward hook adds ``(alpha / r) * B(A(x))`` to
its output. The transformer's own state dict stays the release's; :meth:`LoRA.merged_state_dict`
folds ``W + (alpha / r) B A`` in, which is what a training checkpoint stores, so every loader reads
it as a plain TAG-MoE checkpoint. The adapters themselves are saved beside it, for resuming.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..model.tag_heads import PREFIXES as TAG_HEADS

# Every attention projection of both streams of a Qwen-Image block.
DEFAULT_LORA_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                         "add_v_proj", "to_add_out")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``name`` is a pattern, ends with ``.pattern``, or fits it as a glob (``transformer_blocks.5*.to_q``)."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


class LoRA(nn.Module):
    def __init__(self, model: nn.Module, patterns: Sequence[str], rank: int = 8, alpha: float = 8.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise InputError(f"the LoRA rank must be at least 1, got {rank}")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / int(rank)
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.targets: dict[str, str] = {}  # adapter key -> module name
        for name, module in model.named_modules():
            # The tag heads train whole in a LoRA run; never an adapter on them.
            if isinstance(module, nn.Linear) and matches(name, patterns) and not name.startswith(TAG_HEADS):
                key = name.replace(".", "__")
                weight = module.weight
                down = nn.Linear(module.in_features, self.rank, bias=False, device=weight.device,
                                 dtype=torch.float32)
                bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
                with torch.no_grad():
                    down.weight.uniform_(-bound, bound, generator=generator)
                up = nn.Linear(self.rank, module.out_features, bias=False, device=weight.device, dtype=torch.float32)
                nn.init.zeros_(up.weight)
                self.down[key], self.up[key] = down, up
                self.targets[key] = name
        if not self.targets:
            raise InputError(f"no Linear module of the transformer matches the LoRA modules {', '.join(patterns)} "
                             "(names such as to_q, attn.to_out.0, img_mlp.net.2, transformer_blocks.5*.to_k)")
        self._handles: list = []

    def attach(self, model: nn.Module) -> "LoRA":
        self.detach()
        for key, name in self.targets.items():
            self._handles.append(model.get_submodule(name).register_forward_hook(self._hook(key)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key: str):
        down, up, scale = self.down[key], self.up[key], self.scale

        def add_low_rank(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + (scale * up(down(x.to(down.weight.dtype)))).to(output.dtype)

        return add_low_rank

    @torch.no_grad()
    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict (its own keys) with every adapter folded into its weight."""
        state = {k: v.detach() for k, v in model.state_dict().items()}
        for key, name in self.targets.items():
            weight = state[f"{name}.weight"]
            delta = self.scale * (self.up[key].weight.float() @ self.down[key].weight.float())
            state[f"{name}.weight"] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
        return state
