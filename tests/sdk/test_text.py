"""Text passthrough driven by the official OpenAI Python SDK: a streamed chat completion with usage and
embeddings, through easel to a small OpenAI-compatible text server started here."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai import OpenAI

import conftest

TEXT_CONFIG = """
auth:
  mode: {{mode}}
backends:
  llm:
    kind: openai
    url: {url}/v1
models:
  - id: chat-llm
    type: text
    backends: [llm]
    upstream_model: up-llm
"""

RECEIVED = []


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.send_json({"object": "list", "data": [{"id": "up-llm", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        RECEIVED.append(body)
        if self.path == "/v1/embeddings":
            self.send_json(
                {
                    "object": "list",
                    "data": [{"object": "embedding", "index": i, "embedding": [0.5, float(i)]} for i, _ in enumerate(body["input"])],
                    "model": body["model"],
                    "usage": {"prompt_tokens": 4, "total_tokens": 4},
                }
            )
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"]}
        chunks = [
            dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]),
            dict(head, choices=[{"index": 0, "delta": {"content": "Bonjour"}, "finish_reason": None}]),
            dict(head, choices=[{"index": 0, "delta": {"content": " Paris"}, "finish_reason": None}]),
            dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        ]
        if body.get("stream_options", {}).get("include_usage"):
            chunks.append(dict(head, choices=[], usage={"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}))
        for c in chunks:
            self.write_chunk(f"data: {json.dumps(c)}\n\n".encode())
        self.write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def write_chunk(self, data):
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def text_easel():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    saved = conftest.CONFIG
    conftest.CONFIG = TEXT_CONFIG.format(url=url)
    try:
        e = conftest.Easel("none")
    finally:
        conftest.CONFIG = saved
    yield e
    e.stop()
    server.shutdown()


def client(e):
    return OpenAI(base_url=e.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_stream_with_usage(text_easel):
    stream = client(text_easel).chat.completions.create(
        model="chat-llm",
        messages=[{"role": "user", "content": "Say hello to Paris"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour Paris"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 12
    assert RECEIVED[-1]["model"] == "up-llm"


def test_chat_stream_without_usage_sees_no_usage_chunk(text_easel):
    stream = client(text_easel).chat.completions.create(
        model="chat-llm", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = list(stream)
    assert all(c.choices for c in chunks), "the usage chunk easel asked for is not passed on"
    assert RECEIVED[-1]["stream_options"] == {"include_usage": True}


def test_chat_model_embeddings(text_easel):
    res = client(text_easel).embeddings.create(model="chat-llm", input=["a", "b"])
    assert [d.embedding for d in res.data] == [[0.5, 0.0], [0.5, 1.0]]
    assert res.usage.prompt_tokens == 4
