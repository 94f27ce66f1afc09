"""``chunkllama serve`` end to end: a real server process on 127.0.0.1 (a free port) with a tiny random
model saved to a directory, talked to with the official ``openai`` client and raw HTTP.

One server for the whole module (starting one costs seconds): API key on, ``--max-batch 2``,
``--max-queue 1``, ``--max-context 160``. The tiny model never picks a special token (their
output rows are zeroed), so greedy answers run to ``max_tokens`` and compare exactly.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
MAX_CONTEXT = 160
QUESTION = "The grass is green. What is the pass key?"


def save_tiny_model(directory: Path, tokenizer) -> Path:
    """A tiny random Llama (window 32, so DCA chunks at 20 tokens) + the test tokenizer, saved as a HF dir."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[:3] = 0.0  # <pad>, <|im_start|>, <|im_end|>: never the argmax
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, log_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chunkllama.cli", "serve", "--model", str(model_dir), "--port", str(port),
         "--device", "cpu", *args],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            status, _ = raw(port, "GET", "/health")
            if status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not come up:\n{log_path.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(2)  # Ctrl-C: graceful shutdown
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def raw(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(root / "tiny-llama", tokenizer)
    log_path = root / "server.log"
    proc, port = start_server(model_dir, log_path, "--pretraining-length", "32", "--max-context", str(MAX_CONTEXT),
                              "--max-batch", "2", "--max-queue", "1", "--api-key", KEY, "--prefill-chunk", "16")
    yield {"port": port, "proc": proc, "log": log_path, "model": "tiny-llama"}
    if proc.poll() is None:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask_chat(client, model, stream, **kwargs):
    args = dict(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0)
    args.update(kwargs)
    if not stream:
        return client.chat.completions.create(**args)
    return list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="POSIX signal")
def test_sigusr1_writes_every_threads_stack_and_the_server_goes_on(server, client):
    import signal

    server["proc"].send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while "_serve_loop" not in server["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = server["log"].read_text()  # the engine thread's stack is among them
    assert "_serve_loop" in log and ("Thread 0x" in log or "Current thread" in log), log[-2000:]
    assert ask_chat(client, server["model"], stream=False).choices[0].message.content


def test_models_and_health(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [server["model"]]
    assert raw(server["port"], "GET", "/health") == (200, {"status": "ok", "model": server["model"]})


def test_chat_streamed_equals_non_streamed_with_usage(server, client, tokenizer):
    whole = ask_chat(client, server["model"], stream=False)
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "length" and whole.object == "chat.completion"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (n_prompt, 12, n_prompt + 12)
    assert text
    chunks = ask_chat(client, server["model"], stream=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: prefix cache


def test_completions_streamed_equals_non_streamed(server, client):
    whole = client.completions.create(model=server["model"], prompt="The sky is", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 10
    streamed = client.completions.create(model=server["model"], prompt="The sky is", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text


def test_stop_string_and_seeded_sampling(server, client):
    text = ask_chat(client, server["model"], stream=False, max_tokens=20).choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = ask_chat(client, server["model"], stream=False, max_tokens=20, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    sampled = [ask_chat(client, server["model"], stream=False, temperature=1.0, seed=s).choices[0].message.content
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_answer_prefix_continues_the_final_assistant_message(server, client, tokenizer):
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "The pass key is"}]
    got = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=5, temperature=0,
                                         extra_body={"continue_final_message": True})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert prompt.endswith("The pass key is")
    assert got.usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        client.chat.completions.create(model=server["model"], messages=messages[:1], max_tokens=5,
                                       extra_body={"continue_final_message": True})


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"model": "tiny-llama", "messages": [', 400, "not valid JSON"),
        ({"model": "tiny-llama"}, 400, "messages"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "tiny-llama", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-17"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=2"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"model": "tiny-llama", "messages": [{"role": "user", "content": "The sky is blue. " * 40}]}, 400,
         f"maximum context is {MAX_CONTEXT} tokens"),
    ],
)
def test_bad_input_gets_openai_error(server, body, status, fragment):
    got_status, got = raw(server["port"], "POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {KEY}"})
    assert got_status == status, got
    assert set(got["error"]) == {"message", "type", "param", "code"} and fragment in got["error"]["message"]


def test_context_error_through_the_client_names_the_numbers(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server["model"], prompt="The sky is blue. " * 40, max_tokens=5)
    assert info.value.status_code == 400 and info.value.code == "context_length_exceeded"
    assert "This prompt has" in info.value.message and str(MAX_CONTEXT) in info.value.message


def test_api_key_required(server):
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, got = raw(server["port"], "POST", "/v1/chat/completions", body, headers)
        assert status == 401 and got["error"]["type"] == "authentication_error"
    assert raw(server["port"], "GET", "/v1/models")[0] == 401
    status, got = raw(server["port"], "GET", "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and "error" in got


def open_stream(port, max_tokens=120):
    """A streaming chat request on a raw socket; returns the connection after its first token arrived."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200
    return conn, response


def metrics(port):
    return raw(port, "GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})[1]


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_queue_full_then_disconnects_free_the_slots_and_server_still_answers(server, client):
    before = ask_chat(client, server["model"], stream=False, max_tokens=15).choices[0].message.content
    port = server["port"]
    streams = [open_stream(port, max_tokens=MAX_CONTEXT) for _ in range(3)]  # 2 decoding + 1 waiting (--max-queue 1)
    assert wait_for(lambda: metrics(port)["active"] + metrics(port)["prefilling"] == 2 and metrics(port)["queue_depth"] == 1)
    with pytest.raises(openai.RateLimitError) as info:
        ask_chat(client, server["model"], stream=False)
    assert info.value.status_code == 429
    for conn, response in streams:
        response.read(40)  # the first bytes of the stream arrived
        conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
        conn.close()
    assert wait_for(lambda: metrics(port)["active"] + metrics(port)["queue_depth"] + metrics(port)["prefilling"] == 0)
    m = metrics(port)
    assert m["cancelled"] >= 2, m
    after = ask_chat(client, server["model"], stream=False, max_tokens=15).choices[0].message.content
    assert after == before
    # one log line per request with its id and token counts
    lines = [line for line in server["log"].read_text().splitlines() if "prompt=" in line]
    assert any("chatcmpl-" in line and " ok " in line and "completion=15" in line for line in lines)


def test_graceful_shutdown(server):
    code = stop_server(server["proc"])
    assert code == 0, server["log"].read_text()[-2000:]
    assert "engine stopped" in server["log"].read_text()


def test_health_reports_an_engine_stopped_by_a_device_error(tmp_path, tokenizer, monkeypatch):
    """In process (the error is injected): after a fatal device error the stream ends with an error,
    /health answers 503 with the reason, and new requests get 503 instead of waiting forever."""
    import transformers
    from fastapi.testclient import TestClient

    from chunkllama import apply_dca
    from chunkllama.serving.batching import BatchedEngine
    from chunkllama.serving.server import create_app

    model = apply_dca(transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, tokenizer)).eval())
    engine = BatchedEngine(model, tokenizer, max_batch=2, max_context=MAX_CONTEXT, eos_token_ids=())

    def lost(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine, "_forward", lost)
    body = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    with TestClient(create_app(engine, model_name="tiny")) as client:
        assert client.get("/health").status_code == 200
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 500 and "illegal memory access" in first.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and "illegal memory access" in health.json()["error"]
        again = client.post("/v1/chat/completions", json=body)
        assert again.status_code == 503 and "restart the server" in again.json()["error"]["message"]
