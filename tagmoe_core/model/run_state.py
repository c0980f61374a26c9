"""What one sampling run asks of the MoE routers: an additive logit bias (tag guidance) and an
observer of every routing decision (routing analysis).

The state is context-local (a :class:`contextvars.ContextVar`), never an attribute of a shared
layer: two runs on one model in two threads each see only their own, and a run that ends
(normally or by an exception) leaves nothing behind. Both MoE layers (the MegaBlocks-layout one of
the diffusers path and the per-expert Linear one of the ComfyUI path) read it through
:func:`current_routing`; the code that starts a run enters :func:`routing_run`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch


class RoutingObserver(Protocol):
    """Receives every routing decision of a run (see ``intent.routing.RoutingRecorder``)."""

    def __call__(self, layer_index: int, scores: torch.Tensor, top_experts: torch.Tensor,
                 top_weights: torch.Tensor, input_shape: torch.Size) -> None: ...


@dataclass(frozen=True)
class RoutingRun:
    logit_bias: torch.Tensor | None = None  # [E], added to every router's logits
    observer: RoutingObserver | None = None


_NONE = RoutingRun()
_CURRENT: contextvars.ContextVar[RoutingRun] = contextvars.ContextVar("tagmoe_routing_run", default=_NONE)


def current_routing() -> RoutingRun:
    return _CURRENT.get()


@contextlib.contextmanager
def routing_run(*, logit_bias: torch.Tensor | None = None,
                observer: RoutingObserver | None = None) -> Iterator[RoutingRun]:
    """Routing state for the ``with`` block, on top of the enclosing run's (fields not given are kept)."""
    outer = _CURRENT.get()
    changes = {k: v for k, v in (("logit_bias", logit_bias), ("observer", observer)) if v is not None}
    token = _CURRENT.set(replace(outer, **changes))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)
