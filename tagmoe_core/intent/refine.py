"""Instruction refinement (and task tagging) with a vision-language model that sees the image.

The TAG-MoE README says the authors refine instructions with a VLM but publishes no prompt;
the prompts here are this project's. Three backends answer the same chat:

* :class:`TextEncoderVLM`: the Qwen2.5-VL text encoder already loaded for TAG-MoE (it is a
  full instruct VLM), so no second 7B model is needed;
* :class:`LocalVLM`: another local Qwen2-VL/Qwen2.5-VL-style folder, loaded with transformers;
* :class:`OpenAIChatVLM`: any OpenAI-compatible ``/chat/completions`` endpoint.

Answers that refuse, are empty or run on fall back to the original instruction with a
warning; a dead endpoint is an error, raised after bounded retries and time.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Protocol

import torch
from PIL import Image

from ..errors import TagMoEError
from ..images import to_rgb
from .tagging import TagResult, tags_from_vlm_answer, vlm_tagging_prompt

log = logging.getLogger("tagmoe")

REFINE_SYSTEM = (
    "You are an assistant that prepares instructions for an image-editing model. You see the input image and "
    "a user's instruction. Rewrite the instruction as one precise, self-contained edit instruction: say exactly "
    "what to change, where it is in the image, and how the result should look (colours, materials, sizes, "
    "positions), and end by naming what must stay unchanged (for example the person's identity and face, the "
    "pose, the background, the lighting, the composition, the style). Keep the user's intent; do not add new "
    "edits. Do not describe the whole image. Answer with the instruction only, in one or two sentences."
)
REFINE_USER = "Instruction: {instruction}"
REFUSALS = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i won'?t|i'm unable|i am unable|"
                      r"as an ai|unfortunately,? i)", re.I)
PREFIXES = re.compile(r"^\s*(?:refined|rewritten|improved|edit)?\s*(?:instruction|prompt)\s*:\s*", re.I)


class VLMBackend(Protocol):
    name: str

    def chat(self, system: str, user: str, image: Image.Image | None, max_new_tokens: int, seed: int,
             temperature: float) -> str: ...


@dataclass
class RefineResult:
    instruction: str  # the refined instruction, or the original one when the answer was unusable
    refined: bool
    tags: TagResult | None = None
    warnings: list[str] = field(default_factory=list)
    raw: str = ""


def clean_answer(answer: str) -> str:
    text = answer.strip()
    fenced = re.search(r"```(?:\w+)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    text = PREFIXES.sub("", text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”":
        text = text[1:-1].strip()
    return " ".join(text.split())


def refine_instruction(backend: VLMBackend, instruction: str, image: Image.Image | None, *, seed: int = 0,
                       temperature: float = 0.0, max_new_tokens: int = 160, max_chars: int = 800,
                       with_tags: bool = True) -> RefineResult:
    """Ask ``backend`` for a refined instruction (and, with ``with_tags``, its task tags)."""
    if not str(instruction).strip():
        raise TagMoEError("the instruction to refine is empty")
    raw = backend.chat(REFINE_SYSTEM, REFINE_USER.format(instruction=instruction), image, max_new_tokens, seed,
                       temperature)
    text = clean_answer(raw)
    warnings: list[str] = []
    if not text:
        warnings.append("the VLM answered nothing; keeping the original instruction")
    elif REFUSALS.search(text):
        warnings.append(f"the VLM refused ({text[:80]!r}); keeping the original instruction")
    elif len(text) > max_chars:
        warnings.append(f"the VLM's answer is too long ({len(text)} characters, limit {max_chars}); keeping the "
                        "original instruction")
    refined = not warnings
    result = RefineResult(text if refined else instruction, refined, None, warnings, raw)
    for warning in warnings:
        log.warning("prompt refinement: %s", warning)
    if with_tags:
        result.tags = tag_with_vlm(backend, result.instruction, image, seed=seed, max_new_tokens=max_new_tokens)
        result.warnings += result.tags.warnings
    return result


def tag_with_vlm(backend: VLMBackend, instruction: str, image: Image.Image | None, *, seed: int = 0,
                 max_new_tokens: int = 160, has_image: bool | None = None) -> TagResult:
    """Task tags from the VLM (with the tier definitions); the rules where its answer fails.
    ``has_image`` (default: whether ``image`` is given) says whether the task edits an image."""
    has_image = image is not None if has_image is None else has_image
    answer = backend.chat("You are a precise annotator. Answer in JSON only.",
                          vlm_tagging_prompt(instruction, has_image=has_image), image, max_new_tokens, seed, 0.0)
    return tags_from_vlm_answer(answer, instruction, has_image=has_image)


# -- backends ----------------------------------------------------------------------------------------------
class TextEncoderVLM:
    """Generate with a loaded ``Qwen2_5_VLForConditionalGeneration`` (e.g. TAG-MoE's text encoder)."""

    name = "text encoder"

    def __init__(self, model, tokenizer, image_processor=None):
        from .vlm import default_vlm_image_processor

        self.model, self.tokenizer = model, tokenizer
        self.image_processor = image_processor or default_vlm_image_processor()

    @torch.inference_mode()
    def chat(self, system: str, user: str, image: Image.Image | None, max_new_tokens: int, seed: int,
             temperature: float) -> str:
        from ..runtime.devices import module_device
        from .chat_template import QWEN_VL_CHAT_TEMPLATE
        from .vlm import vlm_image, vlm_inputs

        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": user}]
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                    {"role": "user", "content": content}]
        template = None if getattr(self.tokenizer, "chat_template", None) else QWEN_VL_CHAT_TEMPLATE
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                  chat_template=template)
        device = module_device(self.model)
        if image is not None:
            inputs = vlm_inputs(self.tokenizer, self.image_processor, text, [vlm_image(image)], device=device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        else:
            tokens = self.tokenizer([text], return_tensors="pt")
            inputs = {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": 0.9} if temperature > 0 \
            else {"do_sample": False}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class LocalVLM(TextEncoderVLM):
    """A Qwen2-VL / Qwen2.5-VL instruct model in a local folder (weights, tokenizer, processor config)."""

    name = "local VLM"

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        path = os.path.expanduser(str(folder))
        if not os.path.isdir(path):
            raise TagMoEError(f"the VLM folder '{folder}' does not exist")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise TagMoEError(f"'{folder}' is not a loadable vision-language model folder: {exc}") from exc
        image_processor = None
        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            from transformers import Qwen2VLImageProcessorPil

            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        super().__init__(model, tokenizer, image_processor)


class OpenAIChatVLM:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama, LM Studio, ...).

    The API key is read from the environment variable named by ``api_key_env`` (never stored).
    """

    name = "OpenAI-compatible endpoint"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 2, backoff: float = 1.0):
        if not re.match(r"^https?://", base_url or ""):
            raise TagMoEError(f"the endpoint URL must start with http:// or https://, got {base_url!r}")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/chat/completions")
                                           else "/chat/completions")
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)

    def chat(self, system: str, user: str, image: Image.Image | None, max_new_tokens: int, seed: int,
             temperature: float) -> str:
        content: list[dict] = [{"type": "text", "text": user}]
        if image is not None:
            buffer = io.BytesIO()
            to_rgb(image).save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": url}})
        body = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": content}],
                "max_tokens": max_new_tokens, "temperature": float(temperature), "seed": int(seed) % 2**31}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode())
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:200]
                last = f"HTTP {exc.code} {exc.reason}: {detail}"
                if exc.code in (401, 403):
                    raise TagMoEError(f"the endpoint {self.url} refused the API key (HTTP {exc.code}); set "
                                      f"${self.api_key_env}") from exc
                if exc.code not in (408, 429) and exc.code < 500:
                    raise TagMoEError(f"the endpoint {self.url} rejected the request: {last}") from exc
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"no answer within {self.timeout:g} s" if "timed out" in str(reason) else str(reason)
                continue
            except ValueError as exc:
                raise TagMoEError(f"the endpoint {self.url} did not answer with JSON: {exc}") from exc
            try:
                return payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError) as exc:
                raise TagMoEError(f"unexpected answer from {self.url}: {str(payload)[:200]}") from exc
        raise TagMoEError(f"the VLM endpoint {self.url} is not reachable after {self.retries + 1} tries: {last}")
