"""What trains and how: ``train(TrainConfig(...))`` (the ``tagmoe train`` command).

* ``train="whole"``: every transformer weight; ``"moe"``: the MoE layers (routers and experts) and
  the tag heads (``tag_embedding``, ``router_head``); ``"lora"``: low-rank adapters on the chosen
  Linear modules (``training.lora``) and the tag heads. Everything else is frozen, and the VAE and
  text encoder always are (the data is encoded once, before the first step). ``train_tag_embedding``
  False freezes ``tag_embedding`` too (``s`` then stays where the checkpoint put it).
* Every check runs before the first step: flags, the data folder, the checkpoints to resume from,
  the model (a checkpoint that does not fit the base model is refused by the loader).
* Reproducible: the batches of epoch ``e`` and the sigmas, noise and text dropout of step ``k``
  come from generators seeded by ``(seed, e)`` and ``(seed, k)``, so a resumed run takes exactly
  the steps an uninterrupted one would (on the same device).
* ``ema_decay`` > 0 keeps an exponential moving average of the trained weights (diffusers'
  ``EMAModel``: the decay at step k is ``min(ema_decay, (1 + k) / (10 + k))``, so 0.999 is reached after
  ~9000 steps): the checkpoints' ``transformer/`` then holds the averaged weights (the model to use; a LoRA
  run's is ``W + s avg(B) avg(A)``), and ``training_state.pt`` the live ones and the average (two more
  copies of the trained parameters), so a resumed run takes exactly the steps an uninterrupted one would.
* Weights train in float32 (``dtype`` bfloat16 stores the frozen ones in bfloat16); on CUDA the
  forward runs under bfloat16 autocast (``bf16``) and ``gradient_checkpointing`` recomputes each
  block's activations in the backward pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import InputError, TagMoEError, UnexpectedKeysError
from ..model.checkpoint import CheckpointReader, resolve_weight_files
from ..model.layout import read_transformer_config
from ..model.loading import check_shapes
from ..model.moe import TagMoEFeedForward, moe_layers
from ..model.tag_heads import PREFIXES as TAG_HEAD_PREFIXES
from .checkpoints import checkpoints, latest_checkpoint, load_lora, load_state, save_checkpoint
from .data import EncodedSample, encode_empty_prompt, encode_samples, read_samples
from .lora import DEFAULT_LORA_MODULES, LoRA
from .losses import (LossTerms, RoutingTape, alignment_loss, draw_sigmas, flow_loss, load_balancing_loss, noised,
                     objective, predicted_semantics, routing_signature, semantic_embeddings)

log = logging.getLogger("tagmoe")

TRAIN_MODES = ("whole", "moe", "lora")
LOG_FILE = "train_log.jsonl"
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("train", "seed", "batch_size", "lora_rank", "lora_alpha", "lora_modules", "train_tag_embedding",
               "text_dropout", "ema_decay", "optimizer")
# Resume keys added later, with the value every run saved before them had.
LATER_KEYS = {"ema_decay": 0.0, "optimizer": "adamw"}
OPTIMIZERS = ("adamw", "muon")


@dataclass
class TrainConfig:
    data: str
    output: str
    base: str
    tagmoe: str
    train: str = "moe"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    lambda_lbl: float = 0.01
    lambda_align: float = 0.1
    seed: int = 0
    resume: bool = False
    save_every: int = 0  # 0: only at the end
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_modules: tuple[str, ...] = DEFAULT_LORA_MODULES
    train_tag_embedding: bool = True
    text_dropout: float = 0.0  # share of steps whose prompt is the empty one (for true CFG)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no moving average; else the checkpoints hold the averaged weights
    optimizer: str = "adamw"  # "muon": Muon for the blocks' matrices (training.muon), AdamW for the rest
    muon_lr: float = 0.0  # the Muon groups' learning rate; 0: lr
    device: str = "auto"
    dtype: str = "fp32"  # of the frozen weights: fp32 or bf16
    bf16: bool | None = None  # bf16 autocast; None: on CUDA
    gradient_checkpointing: bool = False


@dataclass
class StepReport:
    step: int  # 1-based: steps done
    total: int
    terms: dict[str, float]
    seconds: float

    def line(self) -> str:
        t = self.terms
        return (f"step {self.step}/{self.total}  loss {t['loss']:.4f}  flow {t['flow']:.4f}  lbl {t['lbl']:.4f}  "
                f"align {t['align']:.4f}  {self.seconds:.2f}s/step")


Progress = Callable[[StepReport], None]


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # every step's loss terms, from step 1 (a resumed run's included)
    checkpoint: Path | None
    seconds_per_step: float = 0.0
    trainer: "Trainer | None" = field(default=None, repr=False)


def check_config(config: TrainConfig) -> None:
    """Every flag, before anything is read."""
    if config.train not in TRAIN_MODES:
        raise InputError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {config.train!r}")
    if config.optimizer not in OPTIMIZERS:
        raise InputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    if config.optimizer == "muon" and config.train != "whole":
        raise InputError(f"--optimizer muon trains the transformer blocks' weight matrices, which --train "
                         f"{config.train} keeps frozen: use --train whole, or --optimizer adamw")
    for name in ("steps", "batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
    if config.save_every < 0:
        raise InputError(f"--save-every must be 0 (only at the end) or more, got {config.save_every}")
    numbers = {"lr": config.lr, "lambda_lbl": config.lambda_lbl, "lambda_align": config.lambda_align,
               "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
               "text_dropout": config.text_dropout, "lora_alpha": config.lora_alpha, "ema_decay": config.ema_decay,
               "muon_lr": config.muon_lr}
    for name, value in numbers.items():
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value!r}")
    if config.lr <= 0:
        raise InputError(f"--lr must be positive, got {config.lr}")
    if config.ema_decay >= 1:
        raise InputError(f"--ema-decay must be below 1 (0: no moving average; e.g. 0.999), got {config.ema_decay}")
    if config.text_dropout > 1:
        raise InputError(f"--text-dropout is a share of steps, from 0 to 1; got {config.text_dropout}")
    if config.train == "lora" and config.lora_rank < 1:
        raise InputError(f"--lora-rank must be at least 1, got {config.lora_rank}")
    if config.dtype not in ("fp32", "bf16"):
        raise InputError(f"--dtype must be fp32 or bf16 for training, got {config.dtype!r}")
    if not 0 <= config.seed < 2**63:
        raise InputError(f"--seed must be between 0 and 2^63 - 1, got {config.seed}")


def _settings(config: TrainConfig) -> dict:
    out = asdict(config)
    out["lora_modules"] = list(config.lora_modules)
    return out


def _check_output(output: Path) -> None:
    """The checkpoints' folder can be written (or created): found now, not at the first save."""
    if output.exists() and not output.is_dir():
        raise InputError(f"--output '{output}' is a file; give a folder for the checkpoints")
    existing = output.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"--output '{output}' cannot be created: '{existing}' is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--output '{output}' cannot be written: no write permission in '{existing}'")


def _resume_point(config: TrainConfig) -> tuple[Path | None, dict | None]:
    output = Path(config.output)
    _check_output(output)
    latest = latest_checkpoint(output)
    if latest is None:
        if config.resume:
            log.warning("no checkpoint in '%s' to resume from: training starts at step 0", output)
        return None, None
    if not config.resume:
        raise InputError(f"--output '{output}' already holds checkpoints (the latest: {latest.name}); pass --resume "
                         "to continue from it, or choose another --output")
    state = load_state(latest)
    saved = state.get("config", {})
    current = _settings(config)
    saved = {**LATER_KEYS, **saved}
    relevant = [k for k in RESUME_KEYS if k in saved and (config.train == "lora" or not k.startswith("lora_"))]
    differ = [f"{k} {saved[k]!r} (now {current[k]!r})" for k in relevant if saved[k] != current[k]]
    if differ:
        raise InputError(f"{latest} was trained with {', '.join(differ)}: resume with the same settings")
    return latest, state


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64) @ np.array([1, 2**32], dtype=np.uint64)) & (2**63 - 1)


def select_trainable(transformer: nn.Module, mode: str, lora: LoRA | None,
                     train_tag_embedding: bool = True) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what ``mode`` trains (float32 master weights); the list, in a fixed order."""
    transformer.requires_grad_(False)
    chosen: list[nn.Parameter] = []
    if mode == "whole":
        chosen = [p for n, p in transformer.named_parameters() if not n.endswith("img_mlp.experts.bias")]
    elif mode == "moe":
        for layer in moe_layers(transformer):
            chosen += [layer.router.layer.weight, layer.experts.mlp.w1, layer.experts.mlp.w2]
    if mode != "whole":
        chosen += list(transformer.router_head.parameters()) + list(transformer.tag_embedding.parameters())
    if not train_tag_embedding:
        frozen = {id(p) for p in transformer.tag_embedding.parameters()}
        chosen = [p for p in chosen if id(p) not in frozen]
    for param in chosen:
        if param.dtype != torch.float32:
            param.data = param.data.float()
        param.requires_grad_(True)
    if lora is not None:
        chosen += list(lora.parameters())
    return chosen


def muon_parameters(transformer: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Of the trained ``params``, the weight matrices inside the transformer blocks (attention, the dense
    FFNs, the modulation Linears): what Muon trains. The routers, the stacked experts (AdamW trains
    them: Muon gave no gain on them in the tiny model's probes, for a fifth more time a step), the input
    and output layers, norms, biases and tag heads stay on AdamW, as Muon's authors place them."""
    trained = {id(p) for p in params}
    return [p for n, p in transformer.named_parameters()
            if id(p) in trained and p.ndim == 2 and n.startswith("transformer_blocks.")
            and ".router." not in n and ".experts." not in n]


def group_lr(config: TrainConfig, group: dict) -> float:
    return (config.muon_lr or config.lr) if group.get("muon") else config.lr


def make_optimizer(transformer: nn.Module, params: list[nn.Parameter], config: TrainConfig,
                   fused: bool | None) -> torch.optim.Optimizer:
    """AdamW over ``params``; with ``optimizer`` "muon", Muon for :func:`muon_parameters` (one optimizer)."""
    if config.optimizer != "muon":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    from .muon import MuonWithAdamW

    matrices = muon_parameters(transformer, params)
    if not matrices:
        raise InputError("--optimizer muon: this run trains no weight matrix inside the transformer blocks")
    chosen = {id(p) for p in matrices}
    groups = [{"params": matrices, "muon": True, "lr": group_lr(config, {"muon": True})},
              {"params": [p for p in params if id(p) not in chosen]}]
    return MuonWithAdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


@dataclass
class Batch:
    x0: torch.Tensor  # [B, N, 64]
    condition: torch.Tensor | None  # [B, M, 64]
    prompt: torch.Tensor  # [B, L, D]
    mask: torch.Tensor | None  # [B, L], None when no prompt is padded
    tag_ids: list[list[int]]
    img_shapes: list


def collate(samples: list[EncodedSample], prompts: list[torch.Tensor]) -> Batch:
    length = max(p.shape[0] for p in prompts)
    prompt = torch.stack([torch.cat([p, p.new_zeros(length - p.shape[0], p.shape[1])]) for p in prompts])
    mask = torch.stack([torch.arange(length) < p.shape[0] for p in prompts]).long()
    condition = torch.stack([s.condition for s in samples]) if samples[0].condition is not None else None
    return Batch(torch.stack([s.target for s in samples]), condition, prompt, None if bool(mask.all()) else mask,
                 [s.tag_ids for s in samples], [s.img_shapes for s in samples])


class Trainer:
    """One training run on a loaded pipeline: ``step()`` takes one optimizer step."""

    def __init__(self, pipe, samples: list[EncodedSample], config: TrainConfig, *, lora: LoRA | None = None,
                 empty_prompt: torch.Tensor | None = None, start_step: int = 0,
                 history: list[dict[str, float]] | None = None, optimizer_state: dict | None = None,
                 ema_state: dict | None = None, live_weights: list[torch.Tensor] | None = None):
        self.pipe, self.transformer, self.samples, self.config = pipe, pipe.transformer, samples, config
        self.device = pipe.device
        self.lora = lora.attach(self.transformer) if lora is not None else None
        self.empty_prompt = empty_prompt
        self.params = select_trainable(self.transformer, config.train, lora, config.train_tag_embedding)
        # The fused kernel: one call for all parameters (8% of a tiny CPU step, where the per-parameter
        # loop is overhead); the same update within float rounding.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in self.params)
        self.optimizer = make_optimizer(self.transformer, self.params, config, fused=fused or None)
        if optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError, RuntimeError) as exc:
                raise InputError("the checkpoint's optimizer state does not fit the parameters this run trains "
                                 f"({' '.join(str(exc).split())[:160]})") from exc
            for group in self.optimizer.param_groups:  # this run's --lr and --weight-decay, not the saved ones
                group["lr"] = group_lr(config, group)
                group["weight_decay"] = config.weight_decay
        if live_weights is not None:  # a resumed EMA run: its checkpoint's transformer/ holds the average
            if [tuple(t.shape) for t in live_weights] != [tuple(p.shape) for p in self.params]:
                raise InputError("the checkpoint's training state does not fit the parameters this run trains")
            with torch.no_grad():
                for param, live in zip(self.params, live_weights):
                    param.copy_(live)
        self.ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay, foreach=True)
            if ema_state is not None:
                shadow = ema_state.get("shadow_params") or []
                if [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in self.params]:
                    raise InputError("the checkpoint's moving average does not fit the parameters this run trains")
                self.ema.load_state_dict(ema_state)
                self.ema.to(device=self.device)
        self.step_index = start_step
        self.history = list(history or [])
        self.top_k = moe_layers(self.transformer)[0].top_k
        self.scheduler_config = dict(pipe.scheduler.config)
        self.autocast = bool(config.bf16 if config.bf16 is not None
                             else self.device.type == "cuda" or config.dtype == "bf16")
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(sample.group, []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        self.batches_per_epoch = sum(math.ceil(len(g) / config.batch_size) for g in self.groups)
        self._plan: tuple[int, list[list[int]]] | None = None

    # -- the data order -----------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``: each group shuffled and cut into batches, the batches shuffled."""
        if self._plan is None or self._plan[0] != epoch:
            generator = torch.Generator().manual_seed(_seed_for(self.config.seed, 0, epoch))
            batches = []
            for group in self.groups:
                order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
                size = self.config.batch_size
                batches += [order[i:i + size] for i in range(0, len(order), size)]
            self._plan = (epoch, [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
        return self._plan[1]

    def batch_indices(self, step: int) -> list[int]:
        return self.epoch_plan(step // self.batches_per_epoch)[step % self.batches_per_epoch]

    # -- one step ------------------------------------------------------------------------------------------
    def losses(self, batch: Batch, sigma: torch.Tensor, noise: torch.Tensor) -> LossTerms:
        """The objective on ``batch`` at ``sigma`` [B] with ``noise`` (the graph kept for backward)."""
        device = self.device
        x0, noise = batch.x0.to(device), noise.to(device)
        x_t = noised(x0, noise, sigma.to(device))
        hidden = x_t if batch.condition is None else torch.cat([x_t, batch.condition.to(device)], dim=1)
        tape = RoutingTape()
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast)
        with tape.recording(), autocast:
            out = self.transformer(hidden_states=hidden, timestep=sigma.to(device, x0.dtype),
                                   encoder_hidden_states=batch.prompt.to(device),
                                   encoder_hidden_states_mask=None if batch.mask is None else batch.mask.to(device),
                                   img_shapes=batch.img_shapes, return_dict=False)[0]
            flow = flow_loss(out[:, :x0.shape[1]], x0, noise)
            lbl = load_balancing_loss(tape, self.top_k)
            g = routing_signature(tape)
            s_hat = predicted_semantics(self.transformer.router_head, g)
            align = alignment_loss(s_hat, semantic_embeddings(self.transformer.tag_embedding, batch.tag_ids))
        return objective(flow, lbl, align, self.config.lambda_lbl, self.config.lambda_align)

    def step_inputs(self, step: int) -> tuple[Batch, torch.Tensor, torch.Tensor]:
        """Step ``step``'s batch, sigmas and noise (drawn on the CPU from the step's own generator)."""
        generator = torch.Generator().manual_seed(_seed_for(self.config.seed, 1, step))
        chosen = [self.samples[i] for i in self.batch_indices(step)]
        prompts = [s.prompt for s in chosen]
        if self.config.text_dropout and self.empty_prompt is not None:
            drop = torch.rand(len(chosen), generator=generator) < self.config.text_dropout
            prompts = [self.empty_prompt if d else p for p, d in zip(prompts, drop.tolist())]
        batch = collate(chosen, prompts)
        sigma = draw_sigmas(len(chosen), batch.x0.shape[1], generator, self.scheduler_config)
        noise = torch.randn(batch.x0.shape, generator=generator, dtype=batch.x0.dtype)
        return batch, sigma, noise

    def step(self, inputs: tuple[Batch, torch.Tensor, torch.Tensor] | None = None) -> StepReport:
        """One optimizer step on the next batch (or on ``inputs``: a batch, its sigmas and noise)."""
        start = time.perf_counter()
        terms = self.losses(*(inputs if inputs is not None else self.step_inputs(self.step_index)))
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.step_index += 1
        values = terms.as_dict()
        self.history.append(values)
        return StepReport(self.step_index, self.config.steps, values, time.perf_counter() - start)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The transformer's weights in the release's key layout (LoRA folded in; with ``ema_decay``, the
        averaged weights)."""
        if self.ema is None:
            return self._live_release_state_dict()
        trained = {p.data_ptr() for p in self.params}
        self.ema.store(self.params)
        try:
            self.ema.copy_to(self.params)
            # Only what aliases a trained parameter is copied (to the host, as the checkpoint is written
            # anyway): the frozen weights do not change, and LoRA's merged ones are new tensors already.
            return {k: v.to("cpu", copy=True) if v.data_ptr() in trained else v
                    for k, v in self._live_release_state_dict().items()}
        finally:
            self.ema.restore(self.params)

    def _live_release_state_dict(self) -> dict[str, torch.Tensor]:
        if self.lora is not None:
            return self.lora.merged_state_dict(self.transformer)
        return {k: v.detach() for k, v in self.transformer.state_dict().items()}

    def save(self) -> Path:
        config = self.config
        state = {"step": self.step_index, "optimizer": self.optimizer.state_dict(), "history": self.history,
                 "config": _settings(config)}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
            state["live"] = [p.detach().to("cpu", copy=True) for p in self.params]
        transformer_config = read_transformer_config(config.base, resolve_weight_files(config.tagmoe))
        lora = self.lora.state_dict() if self.lora is not None else None
        try:
            path = save_checkpoint(Path(config.output), self.step_index, self.release_state_dict(), transformer_config,
                                   state, lora)
            _write_log(Path(config.output), self.history)
        except OSError as exc:  # a full disk, a folder removed while training
            raise TagMoEError(f"the checkpoint of step {self.step_index} could not be written to "
                              f"'{config.output}': {exc.strerror or exc}") from exc
        return path


def _write_log(output: Path, history: list[dict[str, float]]) -> None:
    lines = [json.dumps({"step": i + 1, **terms}) for i, terms in enumerate(history)]
    (output / LOG_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))


def prepare(config: TrainConfig, pipe=None) -> Trainer:
    """Check everything, load the model and encode the data: a :class:`Trainer` ready for its first
    step. ``pipe`` (a loaded pipeline, whose transformer this run then trains in place) skips loading."""
    from ..pipeline.builder import load_pipeline

    check_config(config)
    samples = read_samples(config.data)
    resume_from, state = _resume_point(config)
    if pipe is not None and resume_from is not None:
        raise InputError("resuming loads the checkpoint's weights: do not pass a loaded pipeline")
    if pipe is None:
        # A whole or MoE run resumes from its checkpoint's weights; a LoRA run from the original
        # weights plus its adapters.
        source = resume_from if resume_from is not None and config.train != "lora" else config.tagmoe
        dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32
        pipe = load_pipeline(config.base, source, device=config.device, dtype=dtype, backend="torch",
                             placement="single")
    transformer = pipe.transformer
    own_memory(transformer)
    if not any(isinstance(m, TagMoEFeedForward) for m in transformer.modules()):
        raise TagMoEError("the transformer has no MoE layers to train")
    if not getattr(transformer, "tagmoe_has_tag_modules", True):
        log.warning("the checkpoint has no tag_embedding/router_head: they start from zeros")
    lora = None
    if config.train == "lora":
        generator = torch.Generator(device=transformer.img_in.weight.device).manual_seed(_seed_for(config.seed, 2))
        lora = LoRA(transformer, config.lora_modules, config.lora_rank, config.lora_alpha, generator)
        if resume_from is not None:
            try:
                lora.load_state_dict(load_lora(resume_from))
            except RuntimeError as exc:
                raise InputError(f"the adapters in {resume_from} do not fit this model: "
                                 f"{' '.join(str(exc).split())[:200]}") from exc
            _restore_tag_heads(transformer, resume_from)
    encoded = encode_samples(pipe, samples, config.seed)
    empty = encode_empty_prompt(pipe) if config.text_dropout else None
    start = int(state["step"]) if state else 0
    return Trainer(pipe, encoded, config, lora=lora, empty_prompt=empty, start_step=start,
                   history=state.get("history") if state else None,
                   optimizer_state=state.get("optimizer") if state else None,
                   ema_state=state.get("ema") if state else None, live_weights=state.get("live") if state else None)


def own_memory(module: nn.Module) -> None:
    """Copy every CPU tensor of ``module`` that is not at the allocator's 64-byte alignment into memory
    of its own (a tied parameter is one object: copied once, still tied).

    The one-copy loader leaves CPU weights in the safetensors file's map, at whatever offset the file
    gives them: a fresh run and a resumed one then held the same weights at different alignments, and
    CPU BLAS (MKL, by its documentation) may round differently for differently aligned inputs, so a
    resumed run drifted from the uninterrupted one by an ulp on some CPUs. After this every tensor sits
    at 64 bytes in both runs (aligned ones may stay in the map, copy-on-write).
    """
    for sub in module.modules():
        for table in (sub._parameters, sub._buffers):
            for tensor in table.values():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)


def _restore_tag_heads(transformer: nn.Module, checkpoint: Path) -> None:
    """A LoRA run trains the tag heads whole: take them from its checkpoint (stored there exactly; with a
    moving average the checkpoint holds their average, and the live ones come from its training state)."""
    reader = CheckpointReader.open(resolve_weight_files(checkpoint))
    try:
        keys = [k for k in reader.keys() if k.startswith(TAG_HEAD_PREFIXES)]
        params = dict(transformer.named_parameters())
        unknown = [k for k in keys if k not in params]
        if unknown:
            raise UnexpectedKeysError(unknown, reader.describe(), hint="resume with the model it was trained on")
        check_shapes([(k, reader) for k in keys], {k: tuple(params[k].shape) for k in keys})
        with torch.no_grad():
            for key, tensor in reader.tensors(keys):
                params[key].copy_(tensor)
    finally:
        reader.close()


def train(config: TrainConfig, progress: Progress | None = None, pipe=None) -> TrainResult:
    """Train ``config.steps`` steps in all (a resumed run: the rest), saving every ``save_every``
    steps and at the end; ``progress`` sees every step's loss terms."""
    trainer = prepare(config, pipe)
    if trainer.step_index >= config.steps:
        log.warning("the checkpoint is at step %d already (--steps %d): nothing to train", trainer.step_index,
                    config.steps)
        return TrainResult(trainer.history, latest_checkpoint(Path(config.output)), 0.0, trainer)
    seconds, done = 0.0, 0
    checkpoint = None
    while trainer.step_index < config.steps:
        report = trainer.step()
        seconds, done = seconds + report.seconds, done + 1
        if progress is not None:
            progress(report)
        last = trainer.step_index == config.steps
        if last or (config.save_every and trainer.step_index % config.save_every == 0):
            checkpoint = trainer.save()
    return TrainResult(trainer.history, checkpoint, seconds / max(done, 1), trainer)


def saved_steps(output: str | Path) -> list[int]:
    return [step for step, _ in checkpoints(Path(output))]
