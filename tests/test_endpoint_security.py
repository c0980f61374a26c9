"""The OpenAI-compatible endpoint client against hostile or broken servers, all real HTTP servers
on loopback: credentials never cross origins, one deadline per request, a capped body, and no
API key in any message or log line."""

from __future__ import annotations

import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tagmoe_core.errors import TagMoEError
from tagmoe_core.intent import refine
from tagmoe_core.intent.refine import OpenAIChatVLM

KEY = "sk-live-0123456789abcdef"
KEY_ENV = "TAGMOE_SECURITY_TEST_KEY"


class Server:
    """A loopback HTTP server; ``respond(handler, n)`` answers the n-th request (1-based) by writing
    to ``handler`` (send_response/... or raw bytes on ``handler.wfile``). Every request is recorded
    as (method, path, headers, body)."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler, int], None]):
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.stop = threading.Event()
        self.finished = threading.Event()  # set when a handler has returned
        self.sent = 0  # bytes a streaming handler managed to write
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_one(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                owner.requests.append((self.command, self.path, dict(self.headers), body))
                self.close_connection = True
                self.stop = owner.stop  # set when the test is over: long answers end
                try:
                    respond(self, len(owner.requests))
                except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                    pass
                finally:
                    owner.finished.set()

            do_GET = do_POST = handle_one  # noqa: N815 - http.server's API

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.url = self.origin + "/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def send_json(handler: BaseHTTPRequestHandler, status: int, payload, headers: dict[str, str] | None = None):
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


def reply(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def redirect(handler: BaseHTTPRequestHandler, code: int, location: str) -> None:
    handler.send_response(code)
    handler.send_header("Location", location)
    handler.send_header("Content-Length", "0")
    handler.end_headers()


def client(url: str, **kwargs) -> OpenAIChatVLM:
    kwargs.setdefault("timeout", 5)
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff", 0.01)
    return OpenAIChatVLM(url, "m", api_key_env=KEY_ENV, **kwargs)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def ask(vlm: OpenAIChatVLM) -> str:
    return vlm.chat("system", "user", None, 8, 0, 0.0)


# -- 1. redirects: credentials never cross origins ---------------------------------------------------------
@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_cross_origin_redirect_is_refused_and_the_other_host_never_sees_the_key(code):
    with Server(lambda h, n: send_json(h, 200, reply("stolen"))) as other:
        with Server(lambda h, n: redirect(h, code, other.url + "/chat/completions")) as first:
            with pytest.raises(TagMoEError) as info:
                ask(client(first.url))
    message = str(info.value)
    assert "redirect" in message and "another origin" in message and other.origin in message
    assert "\n" not in message and KEY not in message
    assert first.requests[0][2]["Authorization"] == f"Bearer {KEY}"  # the configured endpoint gets it
    assert not any("Authorization" in headers for _, _, headers, _ in other.requests)
    assert other.requests == []  # nothing at all goes to the other origin


@pytest.mark.parametrize("location", ["https://127.0.0.1:{port}/v1/chat/completions",  # scheme differs
                                      "http://localhost:{port}/v1/chat/completions"])  # host differs
def test_a_redirect_changing_scheme_or_host_is_cross_origin(location):
    with Server(lambda h, n: redirect(h, 302, location.format(port=first.port))) as first:
        with pytest.raises(TagMoEError, match="another origin"):
            ask(client(first.url))
    assert len(first.requests) == 1


def test_same_origin_redirect_is_followed_with_the_same_request():
    def respond(h, n):
        if n == 1:
            redirect(h, 308, "/v2/chat/completions")
        else:
            send_json(h, 200, reply("moved answer"))

    with Server(respond) as server:
        assert ask(client(server.url)) == "moved answer"
    (m1, p1, _, b1), (m2, p2, h2, b2) = server.requests
    assert (m1, p1, m2, p2) == ("POST", "/v1/chat/completions", "POST", "/v2/chat/completions")
    assert b2 == b1 and json.loads(b2)["model"] == "m" and h2["Authorization"] == f"Bearer {KEY}"


def test_redirect_loops_are_bounded():
    with Server(lambda h, n: redirect(h, 307, "/v1/chat/completions")) as server:
        with pytest.raises(TagMoEError, match="too many redirects"):
            ask(client(server.url))
    assert 2 <= len(server.requests) <= 12


# -- 2. one overall deadline per request -------------------------------------------------------------------
def drip(where: str, step: float = 0.05, total: float = 6.0):
    """A server that sends its answer one byte every ``step`` seconds, for up to ``total`` seconds
    (no socket read ever waits long), then hangs up before the end of the promised body."""
    body = json.dumps(reply("x" * 400)).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()

    def respond(h, n):
        start = time.monotonic()
        if where == "body":
            h.wfile.write(head)
        data = head + body if where == "headers" else body
        for i in range(len(data)):
            if h.stop.is_set() or time.monotonic() - start > total:
                return
            h.wfile.write(data[i:i + 1])
            time.sleep(step)

    return respond


@pytest.mark.parametrize("where", ["headers", "body"])
def test_a_dripping_server_hits_one_overall_deadline(where):
    with Server(drip(where)) as server:
        vlm = client(server.url, timeout=0.6, retries=0)
        start = time.monotonic()
        with pytest.raises(TagMoEError) as info:
            ask(vlm)
        elapsed = time.monotonic() - start
    message = str(info.value)
    assert elapsed < 0.6 + 0.8, f"took {elapsed:.1f} s for a 0.6 s deadline"
    assert vlm.url in message and "0.6 s" in message and "\n" not in message


def test_the_deadline_applies_to_each_try():
    with Server(drip("body")) as server:
        start = time.monotonic()
        with pytest.raises(TagMoEError, match="not reachable after 2 tries.*0.4 s"):
            ask(client(server.url, timeout=0.4, retries=1))
        elapsed = time.monotonic() - start
    assert len(server.requests) == 2 and elapsed < 2 * 0.4 + 1.0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_the_deadline_holds_over_tls_too(tmp_path, monkeypatch):
    """https://: the deadline watches the TLS socket, which replaces the plain one after the handshake."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client's default, verifying context trusts it
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    for respond, expect in ((lambda h, n: send_json(h, 200, reply("over tls")), "over tls"), (drip("body"), None)):
        server = Server(respond)
        server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
        with server:
            vlm = client(server.url.replace("http://", "https://"), timeout=0.6)
            start = time.monotonic()
            if expect:
                assert ask(vlm) == expect
            else:
                with pytest.raises(TagMoEError, match="within 0.6 s"):
                    ask(vlm)
                assert time.monotonic() - start < 0.6 + 0.8


# -- 3. the response body is capped ------------------------------------------------------------------------
def test_an_answer_larger_than_the_default_cap_is_refused():
    big = reply("y" * (refine.MAX_RESPONSE_BYTES + 1024))
    with Server(lambda h, n: send_json(h, 200, big)) as server:
        with pytest.raises(TagMoEError, match=f"more than {refine.MAX_RESPONSE_BYTES} bytes"):
            ask(client(server.url))
    assert 1 << 20 <= refine.MAX_RESPONSE_BYTES <= 64 << 20  # a few MiB: far above any chat answer


def test_a_streamed_answer_stops_being_read_at_the_cap():
    total = 64 << 20  # no Content-Length: the client cannot know the size before reading

    def respond(h, n):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.end_headers()
        chunk = b" " * (256 << 10)
        while server.sent < total and not server.stop.is_set():
            h.wfile.write(chunk)
            server.sent += len(chunk)

    server = Server(respond)
    with server:
        with pytest.raises(TagMoEError, match="more than 65536 bytes"):
            ask(client(server.url, max_response_bytes=64 << 10))
        assert server.finished.wait(10)
    assert server.sent < total  # the client hung up: it did not swallow the 64 MiB


# -- 4. no key in any message or log line ------------------------------------------------------------------
def echo_headers(status: int):
    """A debugging server that answers with the request's headers (Authorization first)."""
    def respond(h, n):
        lines = [f"Authorization: {h.headers['Authorization']}"] + [f"{k}: {v}" for k, v in h.headers.items()]
        data = ("bad request, you sent:\n" + "\n".join(lines) + f"\n{{\"api_key\": \"{KEY}\"}}").encode()
        h.send_response(status)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return respond


def test_an_error_body_echoing_the_key_is_redacted():
    with Server(echo_headers(400)) as server:
        with pytest.raises(TagMoEError) as info:
            ask(client(server.url))
    message = str(info.value)
    assert KEY not in message and KEY[:12] not in message and "Bearer sk" not in message
    assert "HTTP 400" in message and "[redacted]" in message
    assert "\n" not in message


def test_retry_logs_and_the_final_error_are_redacted(caplog):
    with Server(echo_headers(500)) as server:
        with caplog.at_level(logging.DEBUG, logger="tagmoe"):
            with pytest.raises(TagMoEError, match="not reachable after 2 tries") as info:
                ask(client(server.url, retries=1))
    assert len(server.requests) == 2
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries and "HTTP 500" in retries[0]
    assert KEY not in caplog.text and KEY not in str(info.value) and "HTTP 500" in str(info.value)


def test_unexpected_answers_are_redacted():
    with Server(lambda h, n: send_json(h, 200, {"echo": {"Authorization": f"Bearer {KEY}"}})) as server:
        with pytest.raises(TagMoEError, match="unexpected answer") as info:
            ask(client(server.url))
    assert KEY not in str(info.value)


@pytest.mark.parametrize("text, secret, hidden", [
    (f"Authorization: Bearer {KEY}", KEY, KEY),
    ("authorization=Bearer abc.def-123, next", "", "abc.def-123"),
    ('{"Authorization": "Basic dXNlcjpwYXNz"}', "", "dXNlcjpwYXNz"),
    ("got bearer tok_ABC123/xyz+= in the logs", "", "tok_ABC123"),
    ('{"x-api-key": "k-999"}', "", "k-999"),
    (f"the key {KEY} leaked", KEY, KEY),
])
def test_redact_secrets(text, secret, hidden):
    out = refine.redact_secrets(text, secret)
    assert hidden not in out and "[redacted]" in out
    assert refine.redact_secrets("nothing secret here", KEY) == "nothing secret here"
