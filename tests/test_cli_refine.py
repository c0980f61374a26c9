"""``tagmoe refine``: the Prompt Refine node's backends from the command line, against a real
loopback endpoint and the tiny model's text encoder; errors are one line and exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_endpoint_security import Server, redirect, reply, send_json

from tagmoe_core.cli import main

KEY = "sk-cli-test-9876543210"
REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Change the cloak to red color"
REFINED = "Recolor only the cloak a deep red; keep the face, pose and background unchanged."


@pytest.fixture
def image(photo, tmp_path):
    path = tmp_path / "in.png"
    photo.save(path)
    return str(path)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_refine_with_an_endpoint_prints_one_line(image, monkeypatch, capsys):
    monkeypatch.setenv("TAGMOE_CLI_KEY", KEY)
    with Server(lambda h, n: send_json(h, 200, reply(f'Refined instruction: "{REFINED}"'))) as server:
        code = main(["refine", "--image", image, "--prompt", INSTRUCTION, "--endpoint", server.url,
                     "--model", "qwen2.5-vl-7b", "--api-key-env", "TAGMOE_CLI_KEY", "--timeout", "5",
                     "--seed", "3"])
    out = capsys.readouterr().out
    assert code == 0 and lines(out) == [REFINED]
    (method, path, headers, body), = server.requests
    request = json.loads(body)
    assert (method, path, headers["Authorization"]) == ("POST", "/v1/chat/completions", f"Bearer {KEY}")
    assert request["model"] == "qwen2.5-vl-7b" and request["seed"] == 3
    content = request["messages"][1]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,") and INSTRUCTION in content[1]["text"]


def test_refine_with_tags_prints_them_on_a_second_line(image, capsys):
    answers = [reply(REFINED), reply('{"scope": "local editing", "type": ["attribute editing"]}')]
    with Server(lambda h, n: send_json(h, 200, answers[n - 1])) as server:
        code = main(["refine", "--image", image, "--prompt", INSTRUCTION, "--endpoint", server.url,
                     "--model", "m", "--api-key-env", "", "--tags"])
    out = lines(capsys.readouterr().out)
    assert code == 0 and out[0] == REFINED and len(out) == 2
    assert "local editing" in out[1] and "attribute editing" in out[1]
    assert len(server.requests) == 2 and "Authorization" not in server.requests[0][2]


def test_an_unusable_answer_prints_the_original_and_warns_in_a_real_process(image):
    """``python -m tagmoe_core refine`` as a user runs it: stdout is the instruction, the warning goes to stderr."""
    with Server(lambda h, n: send_json(h, 200, reply("I'm sorry, but I can't help with that."))) as server:
        done = subprocess.run([sys.executable, "-m", "tagmoe_core", "refine", "--image", image, "--prompt",
                               INSTRUCTION, "--endpoint", server.url, "--model", "m"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and lines(done.stdout) == [INSTRUCTION]
    assert "refused" in done.stderr and "Traceback" not in done.stderr


def _errors(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = lines(err)[-1]
    assert last.startswith("error: ")
    return last


def test_endpoint_errors_are_one_line_without_the_key(image, monkeypatch, capsys):
    monkeypatch.setenv("TAGMOE_CLI_KEY", KEY)
    base = ["refine", "--image", image, "--prompt", INSTRUCTION, "--model", "m", "--api-key-env", "TAGMOE_CLI_KEY",
            "--retries", "0", "--timeout", "5"]
    with Server(lambda h, n: send_json(h, 401, {"error": "bad key"})) as server:
        assert "refused the API key" in _errors(base + ["--endpoint", server.url], capsys)
    with Server(lambda h, n: send_json(h, 400, {"echo": f"Authorization: Bearer {KEY}"})) as server:
        last = _errors(base + ["--endpoint", server.url], capsys)
        assert "HTTP 400" in last and KEY not in last
    with Server(lambda h, n: send_json(h, 200, reply("x"))) as other:
        with Server(lambda h, n: redirect(h, 302, other.url + "/chat/completions")) as server:
            assert "another origin" in _errors(base + ["--endpoint", server.url], capsys)
    assert other.requests == []
    with Server(lambda h, n: None) as server:
        dead = server.url
    assert "not reachable" in _errors(base + ["--endpoint", dead], capsys)


@pytest.mark.parametrize("argv, message", [
    (["--prompt", INSTRUCTION], "needs a VLM"),
    (["--prompt", INSTRUCTION, "--endpoint", "http://127.0.0.1:9/v1"], "needs --model"),
    (["--prompt", INSTRUCTION, "--endpoint", "127.0.0.1:9", "--model", "m"], "http:// or https://"),
    (["--prompt", INSTRUCTION, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--timeout", "0"],
     "timeout must be positive"),
    (["--prompt", INSTRUCTION, "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--tiny"], "one VLM"),
    (["--prompt", "  ", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"], "empty"),
    (["--prompt", INSTRUCTION, "--vlm-folder", "/nonexistent/vlm"], "does not exist"),
    (["--prompt", INSTRUCTION, "--pretrained_model_path", "/nonexistent/base"], "does not exist"),
    (["--prompt", INSTRUCTION, "--pretrained-model-path", "nobody-here/no-such-repo", "--local-files-only"],
     "cannot load the text encoder of 'nobody-here/no-such-repo'"),
])
def test_refine_argument_errors(image, capsys, argv, message):
    assert message in _errors(["refine", "--image", image] + argv, capsys)


def test_a_missing_image_is_an_error(tmp_path, capsys):
    assert "does not exist" in _errors(["refine", "--image", str(tmp_path / "missing.png"), "--prompt", "x",
                                        "--tiny"], capsys)


def test_refine_with_the_tiny_text_encoder_end_to_end(tiny_bundle, image, capsys):
    argv = ["refine", "--tiny", "--device", "cpu", "--image", image, "--prompt", INSTRUCTION,
            "--max-new-tokens", "12", "--seed", "1", "--temperature", "0.8"]
    assert main(argv) == 0
    first = lines(capsys.readouterr().out)
    assert main(argv) == 0
    again = lines(capsys.readouterr().out)
    assert len(first) == 1 and first[0].strip() and first == again  # a random model: noise, but seeded


def test_refine_with_a_local_vlm_folder(tiny_bundle, image, tmp_path, capsys):
    folder = tmp_path / "vlm"
    shutil.copytree(tiny_bundle.base / "text_encoder", folder)
    for f in (tiny_bundle.base / "tokenizer").iterdir():
        shutil.copy(f, folder)
    assert main(["refine", "--vlm-folder", str(folder), "--device", "cpu", "--image", image, "--prompt",
                 INSTRUCTION, "--max-new-tokens", "8"]) == 0
    out = lines(capsys.readouterr().out)
    assert len(out) == 1 and out[0].strip()
