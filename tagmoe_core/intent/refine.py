"""Instruction refinement (and task tagging) with a vision-language model that sees the image.

The TAG-MoE README says the authors refine instructions with a VLM but publishes no prompt;
the prompts here are this project's. Three backends answer the same chat:

* :class:`TextEncoderVLM`: the Qwen2.5-VL text encoder already loaded for TAG-MoE (it is a
  full instruct VLM), so no second 7B model is needed;
* :class:`LocalVLM`: another local Qwen2-VL/Qwen2.5-VL-style folder, loaded with transformers;
* :class:`OpenAIChatVLM`: any OpenAI-compatible ``/chat/completions`` endpoint (the key goes to
  the endpoint's origin only, one deadline per try, a capped answer, no key in any message).

Answers that refuse, are empty or run on fall back to the original instruction with a
warning; a dead endpoint is an error, raised after bounded retries and time.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
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


class EndpointError(TagMoEError):
    """An OpenAI-compatible endpoint that cannot be used: unreachable, too slow, refusing the key,
    redirecting elsewhere, answering too much or not in the expected form."""


MAX_RESPONSE_BYTES = 4 << 20  # a chat answer is a few KiB; this bounds what a broken or hostile server costs
MAX_REDIRECTS = 5  # same-origin redirects followed per request
_ERROR_BODY_BYTES = 8 << 10  # read of an error body (a message quotes 200 characters of it)
_CHUNK_BYTES = 64 << 10
REDACTED = "[redacted]"
_TOKEN = r"(?=[A-Za-z0-9._~+/-]*[0-9._~+/=-])[A-Za-z0-9._~+/-]{6,}=*"  # has a digit or symbol: not a word
_CREDENTIAL_FIELD = re.compile(r"""((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]?token)"""
                               r"""(["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;&}]+""", re.I)
_SCHEME_CREDENTIAL = re.compile(rf"\b(bearer|basic)\s+{_TOKEN}", re.I)


def redact_secrets(text: str, *secrets: str) -> str:
    """``text`` without the given ``secrets``, ``Bearer``/``Basic`` credentials and the values of
    Authorization / API-key fields: for every message and log line that may quote a server."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _CREDENTIAL_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    return _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {REDACTED}", text)


def _origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port): two URLs with the same origin may share credentials, others may not."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a number: no origin matches it
        port = -1
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _origin_text(url: str) -> str:
    scheme, host, port = _origin(url)
    return f"{scheme}://{host}:{port}"


class _Retryable(Exception):
    """A failed try that another try may fix (network errors, timeouts, 408/429/5xx)."""


class _RedirectRefused(Exception):
    pass


class _Deadline:
    """One deadline for a whole request (connect, TLS, headers, body, redirects). Socket timeouts
    bound each read only, so a server dripping a byte at a time never trips them; at the deadline
    every socket watched here is shut down, which ends the read or write in progress."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self._fired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    @property
    def expired(self) -> bool:
        return self._fired or time.monotonic() >= self.end

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.001)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            fired = self._fired
        if fired:
            _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self._fired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:  # the plain socket's shutdown, also for a TLS socket: no TLS close_notify from another thread
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _watched(base: type[http.client.HTTPConnection], deadline: _Deadline) -> type[http.client.HTTPConnection]:
    """``base`` whose sockets the deadline watches from creation (so the TLS handshake too)."""

    class Watched(base):  # type: ignore[valid-type, misc]
        def connect(self) -> None:
            self.timeout = min(self.timeout, deadline.remaining()) if isinstance(self.timeout, (int, float)) \
                else deadline.remaining()
            create = self._create_connection

            def create_watched(*args, **kwargs):
                sock = create(*args, **kwargs)
                deadline.watch(sock)
                return sock

            self._create_connection = create_watched
            super().connect()
            if self.sock is not None:
                deadline.watch(self.sock)  # a TLS socket replaces (detaches) the plain one

    return Watched


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req, context=self._context)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects within the endpoint's origin only (they keep the Authorization header);
    307/308 repeat the POST with its body, 301/302/303 become a GET as everywhere else."""

    max_repeats = max_redirections = MAX_REDIRECTS + 1  # ours below speaks first

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        count = getattr(req, "tagmoe_redirects", 0) + 1
        if _origin(newurl) != _origin(req.full_url):
            fp.close()
            raise _RedirectRefused(
                f"the endpoint {req.full_url} redirected (HTTP {code}) to another origin, {_origin_text(newurl)}; "
                "not following it, so the API key is not sent there: set the endpoint URL to the address you trust")
        if count > MAX_REDIRECTS:
            fp.close()
            raise _RedirectRefused(f"the endpoint {req.full_url} sent too many redirects (more than {MAX_REDIRECTS})")
        if code in (307, 308):
            new = urllib.request.Request(newurl, data=req.data, headers=dict(req.headers),
                                         origin_req_host=req.origin_req_host, unverifiable=True,
                                         method=req.get_method())
        else:
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.tagmoe_redirects = count
            log.info("VLM endpoint: following a same-origin redirect (HTTP %s) to %s", code,
                     redact_secrets(newurl))
        return new


class OpenAIChatVLM:
    """An OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp server, Ollama, LM Studio, ...).

    The API key is read from the environment variable named by ``api_key_env`` (never stored) and
    sent to the endpoint's origin only: a redirect elsewhere is refused. ``timeout`` is one deadline
    for each try (connect, headers and body together); answers above ``max_response_bytes`` are
    refused; messages and log lines never show the key (see :func:`redact_secrets`).
    """

    name = "OpenAI-compatible endpoint"

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 2, backoff: float = 1.0, max_response_bytes: int = MAX_RESPONSE_BYTES):
        if not re.match(r"^https?://", base_url or ""):
            raise EndpointError(f"the endpoint URL must start with http:// or https://, got {base_url!r}")
        if urllib.parse.urlsplit(base_url).username is not None:
            raise EndpointError("the endpoint URL holds credentials (user:password@); remove them and put the API "
                                "key in the environment variable named by api_key_env")
        if not timeout > 0:
            raise EndpointError(f"the endpoint timeout must be positive, got {timeout!r}")
        if int(max_response_bytes) < 1:
            raise EndpointError(f"max_response_bytes must be positive, got {max_response_bytes!r}")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/chat/completions")
                                           else "/chat/completions")
        self.model, self.api_key_env = model, api_key_env
        self.timeout, self.retries, self.backoff = float(timeout), max(int(retries), 0), float(backoff)
        self.max_response_bytes = int(max_response_bytes)

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
        tries = self.retries + 1
        last = ""
        for attempt in range(tries):
            if attempt:
                wait = self.backoff * 2 ** (attempt - 1)
                log.warning("%s", self._clean(f"VLM endpoint {self.url}: try {attempt} of {tries} failed ({last}); "
                                              f"retrying in {wait:g} s", key))
                time.sleep(wait)
            try:
                return self._attempt(data, headers, key)
            except _Retryable as exc:
                last = str(exc)
        raise self._error(f"the VLM endpoint {self.url} is not reachable after {tries} "
                          f"{'try' if tries == 1 else 'tries'}: {last}", key)

    # -- one try -----------------------------------------------------------------------------------------
    def _attempt(self, data: bytes, headers: dict[str, str], key: str) -> str:
        deadline = _Deadline(self.timeout)
        too_slow = f"no complete answer within {self.timeout:g} s (connect, headers and body)"
        opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline),
                                             _SameOriginRedirects())
        request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        with deadline:
            try:
                with opener.open(request, timeout=self.timeout) as response:
                    raw = self._read_capped(response, key)
                if deadline.expired:
                    raise _Retryable(too_slow)
            except _RedirectRefused as exc:
                raise self._error(str(exc), key) from None
            except urllib.error.HTTPError as exc:
                raise self._http_error(exc, key) from None
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, cut-off bodies
                if deadline.expired:
                    raise _Retryable(too_slow) from None
                reason = getattr(exc, "reason", exc)
                raise _Retryable(f"no answer within {self.timeout:g} s" if "timed out" in str(reason)
                                 else str(reason) or type(reason).__name__) from None
        try:
            payload = json.loads(raw.decode())
        except ValueError as exc:
            raise self._error(f"the endpoint {self.url} did not answer with JSON: {exc}", key) from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise self._error(f"unexpected answer from {self.url}: {str(payload)[:200]}", key) from None

    def _read_capped(self, response, key: str) -> bytes:
        """The body in chunks, refused as soon as it is known to exceed ``max_response_bytes``."""
        limit = self.max_response_bytes
        declared = (response.headers.get("Content-Length") or "").strip()
        too_big = self._error(f"the endpoint {self.url} sent more than {limit} bytes (max_response_bytes); "
                              "stopped reading", key)
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        while True:
            chunk = response.read(min(_CHUNK_BYTES, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_big
        if getattr(response, "length", None):  # fewer bytes than the Content-Length promised
            raise http.client.IncompleteRead(b"".join(chunks), response.length)
        return b"".join(chunks)

    def _http_error(self, exc: urllib.error.HTTPError, key: str) -> Exception:
        try:
            detail = exc.read(_ERROR_BODY_BYTES).decode(errors="replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        finally:
            exc.close()
        status = self._clean(f"HTTP {exc.code} {exc.reason}: {detail}", key)[:240]
        if exc.code in (401, 403):
            return self._error(f"the endpoint {self.url} refused the API key (HTTP {exc.code}); set "
                               f"${self.api_key_env}", key)
        if exc.code not in (408, 429) and exc.code < 500:
            return self._error(f"the endpoint {self.url} rejected the request: {status}", key)
        return _Retryable(status)

    @staticmethod
    def _clean(text: str, key: str) -> str:
        """One line, without the key or any credential a server echoed."""
        return redact_secrets(" ".join(str(text).split()), key)

    def _error(self, message: str, key: str) -> EndpointError:
        return EndpointError(self._clean(message, key))
