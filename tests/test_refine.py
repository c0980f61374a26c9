"""Prompt refinement: the tiny text encoder end to end, a local VLM folder, an OpenAI-compatible
endpoint served on loopback by the test, and the fallbacks."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tagmoe_core.errors import TagMoEError
from tagmoe_core.intent.refine import (
    LocalVLM,
    OpenAIChatVLM,
    TextEncoderVLM,
    clean_answer,
    refine_instruction,
    tag_with_vlm,
)
from tagmoe_core.taxonomy import TaskTags

INSTRUCTION = "Change the cloak to red color"


class Scripted:
    """A VLM backend that answers from a script (tests the handling of answers, not a model)."""

    name = "scripted"

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def chat(self, system, user, image, max_new_tokens, seed, temperature):
        self.calls.append((system, user, image, seed, temperature))
        return self.answers.pop(0)


def test_text_encoder_backend_end_to_end_and_seeded(tiny_pipe, photo):
    vlm = TextEncoderVLM(tiny_pipe.text_encoder, tiny_pipe.tokenizer, tiny_pipe.vlm_image_processor)
    a = refine_instruction(vlm, INSTRUCTION, photo, seed=1, temperature=0.8, max_new_tokens=24)
    b = refine_instruction(vlm, INSTRUCTION, photo, seed=1, temperature=0.8, max_new_tokens=24)
    c = refine_instruction(vlm, INSTRUCTION, photo, seed=2, temperature=0.8, max_new_tokens=24)
    assert a.raw and a.raw == b.raw and a.raw != c.raw  # a random tiny model: text is noise, but seeded
    assert isinstance(a.tags.tags, TaskTags)
    greedy = [vlm.chat("s", "u", photo, 12, seed, 0.0) for seed in (0, 1)]
    assert greedy[0] == greedy[1]  # temperature 0: the seed does not matter
    assert vlm.chat("s", "u", None, 8, 0, 0.0) is not None  # text only works too


def test_local_vlm_folder(tiny_bundle, tmp_path, photo):
    folder = tmp_path / "vlm"
    shutil.copytree(tiny_bundle.base / "text_encoder", folder)
    for f in (tiny_bundle.base / "tokenizer").iterdir():
        shutil.copy(f, folder)
    vlm = LocalVLM(folder)
    answer = vlm.chat("system", "Describe the image", photo, 10, 0, 0.0)
    assert isinstance(answer, str)
    with pytest.raises(TagMoEError, match="does not exist"):
        LocalVLM(tmp_path / "missing")


@pytest.mark.parametrize("answer, refined", [
    ('Refined instruction: "Change only the cloak to a deep red; keep the face, pose and background unchanged."',
     "Change only the cloak to a deep red; keep the face, pose and background unchanged."),
    ("```\nRecolor the cloak red, keeping everything else unchanged.\n```",
     "Recolor the cloak red, keeping everything else unchanged."),
])
def test_answers_are_cleaned(answer, refined, photo):
    result = refine_instruction(Scripted(answer, '{"scope": "local editing", "type": ["attribute editing"]}'),
                                INSTRUCTION, photo)
    assert result.refined and result.instruction == refined
    assert result.tags.tags == TaskTags("local editing", ("attribute editing",))


@pytest.mark.parametrize("answer, reason", [
    ("I'm sorry, but I can't help with editing this image.", "refused"),
    ("   ", "answered nothing"),
    ("Make it red. " * 200, "too long"),
])
def test_unusable_answers_keep_the_original(answer, reason):
    result = refine_instruction(Scripted(answer, "no json here"), INSTRUCTION, None)
    assert not result.refined and result.instruction == INSTRUCTION
    assert any(reason in w for w in result.warnings)
    assert result.tags.source == "rules"  # and the tags come from the rules on the original


def test_empty_instruction_is_an_error():
    with pytest.raises(TagMoEError, match="empty"):
        refine_instruction(Scripted(), "  ", None)


def test_vlm_tagging_prompt_and_image(photo):
    backend = Scripted('{"scope": "global editing", "type": ["style transfer"]}')
    result = tag_with_vlm(backend, "Make it a watercolor", photo)
    assert result.tags.types == ("style transfer",) and backend.calls[0][2] is photo
    assert "style transfer" in backend.calls[0][1]


# -- an OpenAI-compatible endpoint on loopback ---------------------------------------------------------
class Endpoint:
    def __init__(self, behaviour):
        self.requests, self.behaviour = [], behaviour
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append((self.path, dict(self.headers), body))
                status, payload, delay = owner.behaviour(len(owner.requests))
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def reply(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_endpoint_request_and_answer(photo, monkeypatch):
    monkeypatch.setenv("TAGMOE_TEST_KEY", "sk-test-123")
    with Endpoint(lambda n: (200, reply("Recolor the cloak red; keep the person and background."), 0)) as server:
        vlm = OpenAIChatVLM(server.url, "qwen2.5-vl-7b", api_key_env="TAGMOE_TEST_KEY", timeout=5)
        result = refine_instruction(vlm, INSTRUCTION, photo, seed=7, with_tags=False)
    assert result.refined and result.instruction.startswith("Recolor the cloak red")
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test-123"
    assert body["model"] == "qwen2.5-vl-7b" and body["seed"] == 7 and body["temperature"] == 0.0
    content = body["messages"][1]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,") and INSTRUCTION in content[1]["text"]


def test_endpoint_retries_server_errors():
    answers = {1: (500, {"error": "busy"}, 0), 2: (429, {"error": "slow down"}, 0), 3: (200, reply("ok"), 0)}
    with Endpoint(lambda n: answers[n]) as server:
        vlm = OpenAIChatVLM(server.url, "m", api_key_env="", timeout=5, retries=2, backoff=0.01)
        assert vlm.chat("s", "u", None, 8, 0, 0.0) == "ok"
    assert len(server.requests) == 3


def test_endpoint_errors_are_clear_and_bounded():
    with Endpoint(lambda n: (401, {"error": "bad key"}, 0)) as server:
        with pytest.raises(TagMoEError, match="refused the API key"):
            OpenAIChatVLM(server.url, "m", timeout=5).chat("s", "u", None, 8, 0, 0.0)
    with Endpoint(lambda n: (200, reply("late"), 2.0)) as server:
        start = time.monotonic()
        with pytest.raises(TagMoEError, match="not reachable after 2 tries"):
            OpenAIChatVLM(server.url, "m", timeout=0.3, retries=1, backoff=0.01).chat("s", "u", None, 8, 0, 0.0)
        assert time.monotonic() - start < 5  # a dead endpoint is an error, not a hang
    with Endpoint(lambda n: (200, reply("x"), 0)) as server:
        dead = server.url
    with pytest.raises(TagMoEError, match="not reachable"):
        OpenAIChatVLM(dead, "m", timeout=1, retries=0).chat("s", "u", None, 8, 0, 0.0)
    with pytest.raises(TagMoEError, match="http"):
        OpenAIChatVLM("localhost:8000", "m")


def test_clean_answer():
    assert clean_answer("Instruction: 'Make it red.'") == "Make it red."
    assert clean_answer("  a   b\n c ") == "a b c"
