"""``ctxvec serve``: a real server in a subprocess on a free localhost port, called by the official
``openai`` client and by plain HTTP; under concurrency, overload, faults, hostile bodies, and SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest

import ctxvec

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextmanager
def running_server(model: str, *options: str, env: dict | None = None):
    """``ctxvec serve`` on a free port; yields (base URL, process); SIGTERM at the end."""
    command = [sys.executable, "-m", "ctxvec", "serve", "--model", model, "--port", "0", "--threads", "1", *options]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    try:
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture(scope="module")
def minilm():
    return ctxvec.load("minilm")


@pytest.fixture(scope="module")
def server():
    with running_server("minilm", "--api-key", KEY) as (url, proc):
        yield url


def embed(url: str, body, headers=AUTH, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/v1/embeddings", content=data,
                      headers={"Content-Type": "application/json", **headers}, timeout=60, **kw)


TEXTS = ["my name is aj", "the heavens and the earth", "a", "word " * 300, "café ☕ 東京 🙂"]


# ---- the official client and plain HTTP give Pipeline.embed's vectors ----------------------------

@pytest.mark.parametrize("encoding", ["base64", "float"])
def test_the_openai_client_gets_pipeline_embed_vectors(server, minilm, encoding):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=KEY)
    kwargs = {} if encoding == "base64" else {"encoding_format": "float"}  # base64: the client's default
    response = client.embeddings.create(model="minilm", input=TEXTS, **kwargs)
    got = np.array([item.embedding for item in response.data], dtype=np.float32)
    assert [item.index for item in response.data] == list(range(len(TEXTS)))
    assert np.abs(got - minilm.embed(TEXTS)).max() < 1e-6
    assert response.usage.prompt_tokens == sum(len(e.ids) for e in minilm.tokenizer.tokenize(TEXTS))


def test_plain_http_embeddings_report_truncation_and_tokens(server, minilm):
    response = embed(server, {"input": TEXTS, "model": "minilm", "encoding_format": "base64"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == "minilm"
    vectors = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]])
    assert np.abs(vectors - minilm.embed(TEXTS)).max() < 1e-6
    assert [d["truncated"] for d in body["data"]] == [False, False, False, True, False]
    assert body["data"][3]["n_tokens"] == 256 and body["data"][0]["n_tokens"] == 6
    assert body["usage"]["total_tokens"] == sum(d["n_tokens"] for d in body["data"])


def test_a_single_string_dimensions_and_truncate_false(server, minilm):
    one = embed(server, {"input": "my name is aj", "dimensions": 64}).json()["data"]
    assert len(one) == 1 and len(one[0]["embedding"]) == 64
    full = minilm.embed(["my name is aj"])[0][:64]
    assert np.abs(np.array(one[0]["embedding"]) - full / np.linalg.norm(full)).max() < 1e-6
    too_long = embed(server, {"input": ["short", "word " * 300], "truncate": False})
    assert too_long.status_code == 400
    assert too_long.json()["error"]["message"] == ("input[1] has 302 tokens, more than the model's limit of 256 "
                                                   "(truncate is false).")
    assert too_long.json()["error"]["param"] == "input[1]"
    assert embed(server, {"input": "x", "dimensions": 385}).status_code == 400


def test_encode_gives_every_tokens_vector(server, minilm):
    body = httpx.post(f"{server}/v1/encode", json={"input": TEXTS[:2], "encoding_format": "base64"},
                      headers=AUTH, timeout=60).json()
    expected = minilm.encode(TEXTS[:2])
    for item, want in zip(body["data"], expected):
        assert item["tokens"] == want.tokens and item["ids"] == want.ids and item["special"] == want.special
        got = np.frombuffer(base64.b64decode(item["vectors"]), dtype="<f4").reshape(item["shape"])
        assert np.abs(got - want.vectors).max() < 1e-5


def test_large_answers_are_the_same_numbers(server, minilm):
    """Answers past INLINE_ANSWER_VALUES numbers are written off the event loop: the same answers."""
    from ctxvec.serve.app import INLINE_ANSWER_VALUES

    texts = [f"verse {i}: " + " ".join(["light", "and", "waters"][: 1 + i % 3] * (1 + i % 7)) for i in range(200)]
    assert len(texts) * minilm.dim > INLINE_ANSWER_VALUES
    data = embed(server, {"input": texts, "encoding_format": "float"}).json()["data"]
    assert np.abs(np.array([d["embedding"] for d in data]) - minilm.embed(texts)).max() < 1e-5
    body = httpx.post(f"{server}/v1/encode", json={"input": texts, "encoding_format": "float"}, headers=AUTH,
                      timeout=60).json()
    for item, want in zip(body["data"], minilm.encode(texts), strict=True):
        assert item["tokens"] == want.tokens and np.abs(np.array(item["vectors"]) - want.vectors).max() < 1e-5


def test_models_health_and_metrics(server):
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert models["data"][0]["id"] == "minilm" and models["data"][0]["dimensions"] == 384
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    for name in ("ctxvec_requests_total", "ctxvec_request_seconds_bucket", "ctxvec_queue_texts",
                 "ctxvec_queue_tokens", "ctxvec_batch_texts_bucket", "ctxvec_batch_padding_bucket",
                 "ctxvec_tokens_total", "ctxvec_tokens_per_second"):
        assert name in text, name
    assert 'ctxvec_requests_total{endpoint="/v1/embeddings",status="200"}' in text


# ---- concurrency: batching across requests changes no vector ----------------------------------

def test_64_concurrent_requests_each_get_their_own_vectors(server, minilm):
    rng = np.random.default_rng(0)
    words = "the earth was formless and empty darkness on the surface of the deep".split()
    requests = [[" ".join(rng.choice(words, size=int(rng.integers(1, 60)))) for _ in range(int(rng.integers(1, 9)))]
                for _ in range(64)]
    serial = [minilm.embed(texts) for texts in requests]
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda texts: embed(server, {"input": texts}), requests))
    for response, want in zip(responses, serial):
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - want).max() < 1e-6


# ---- hostile and malformed requests: 4xx in OpenAI's shape, never a 500 ------------------------

def _bad_bodies() -> list[tuple[bytes | str, dict]]:
    json_type = {"Content-Type": "application/json"}
    bodies: list = [(b"", json_type), (b"{", json_type), (b"not json", json_type), (b"\xff\xfe\x00", json_type),
                    (b'{"input": "caf\xe9"}', json_type), ("[" * 100_000 + "]" * 100_000, json_type),
                    (json.dumps({"input": "ok"}), {"Content-Type": "text/plain"}),
                    (json.dumps({"input": "ok"}), {"Content-Type": "application/x-www-form-urlencoded"}),
                    (json.dumps({"input": "ok"}), {}), ('{"input": "\\ud800"}', json_type),
                    ('{"input": ["ok", "\\udfff x"]}', json_type)]
    values = [None, 0, 1.5, True, "", [], [""], [None], [1, 2, 3], [[1, 2]], {"text": "x"}, ["ok", 5],
              ["ok"] * 3000]
    for value in values:
        bodies.append((json.dumps({"input": value}), json_type))
    for field, value in [("encoding_format", "hex"), ("encoding_format", None), ("dimensions", 0),
                         ("dimensions", -3), ("dimensions", "8"), ("dimensions", 1.5), ("dimensions", True),
                         ("dimensions", 10**20), ("truncate", "no"), ("model", 5), ("model", "gpt-17"), ("user", [])]:
        bodies.append((json.dumps({"input": "ok", field: value}), json_type))
    for shape in ([], "text", 5, None, {"inputs": "typo"}):
        bodies.append((json.dumps(shape), json_type))
    huge = "1" * 5000  # past Python's 4,300-digit limit for int()
    bodies += [('{"input": "ok", "dimensions": %s}' % huge, json_type), ('{"input": "ok", "x": [%s]}' % huge, json_type)]
    return bodies


BAD = _bad_bodies()


def _post_bad(url: str, path: str, cases: list) -> list[int]:
    statuses = []
    for body, headers in cases:
        response = httpx.post(f"{url}{path}", content=body, headers={**headers, **AUTH}, timeout=60)
        statuses.append(response.status_code)
        if response.status_code == 200:
            continue  # a mutation can leave a valid request
        assert 400 <= response.status_code < 500, (body[:80], response.status_code, response.text[:200])
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith(".")
        assert "Traceback" not in response.text
    return statuses


def test_a_few_hundred_bad_bodies_get_4xx_errors_and_the_server_stays_up(server):
    rng = np.random.default_rng(1)
    cases = list(BAD)
    for _ in range(250):  # random mutations of a good body: truncations and byte flips
        good = bytearray(json.dumps({"input": ["my name is aj", "hello"], "encoding_format": "float"}).encode())
        if rng.random() < 0.5:
            good = good[: int(rng.integers(0, len(good)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                good[int(rng.integers(0, len(good)))] = int(rng.integers(0, 256))
        cases.append((bytes(good), {"Content-Type": "application/json"}))
    statuses = _post_bad(server, "/v1/embeddings", cases)
    assert [(body[:60], s) for (body, _), s in zip(BAD, statuses) if not 400 <= s < 500] == []
    for text in ("x" * 10_000_000, "\u00e9" * 2_000_000):  # 10 MB and 2 M characters: valid, so answered
        response = embed(server, {"input": text})
        assert response.status_code == 200 and response.json()["data"][0]["n_tokens"] == 3
    assert httpx.get(f"{server}/health").status_code == 200
    assert embed(server, {"input": "still serving"}).status_code == 200


def test_bad_bodies_on_encode_get_4xx_errors_too(server):
    bad = [(body, headers) for body, headers in BAD  # /v1/encode has no dimensions or user to get wrong
           if not any(field in str(body) for field in ('"dimensions"', '"user"'))]
    statuses = _post_bad(server, "/v1/encode", bad)
    assert [(body[:60], s) for (body, _), s in zip(bad, statuses) if not 400 <= s < 500] == []
    assert httpx.get(f"{server}/health").status_code == 200


@pytest.mark.parametrize("headers, status", [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                             ({"Authorization": KEY}, 401), (AUTH, 200)])
def test_every_endpoint_but_health_needs_the_key(server, headers, status):
    assert embed(server, {"input": "x"}, headers=headers).status_code == status
    assert httpx.get(f"{server}/v1/models", headers=headers).status_code == status
    assert httpx.get(f"{server}/metrics", headers=headers).status_code == status
    assert httpx.get(f"{server}/health", headers=headers).status_code == 200
    if status == 401:
        error = embed(server, {"input": "x"}, headers=headers).json()["error"]
        assert error["type"] == "authentication_error" and "Bearer" in error["message"]


def test_the_key_can_come_from_the_environment():
    with running_server("seed", env={"CTXVEC_API_KEY": "from-env"}) as (url, _):
        assert embed(url, {"input": "x"}, headers={}).status_code == 401
        assert embed(url, {"input": "x"}, headers={"Authorization": "Bearer from-env"}).status_code == 200


@pytest.mark.parametrize("choice", ["default", "system"])
def test_the_server_runs_under_jemalloc_where_installed_with_the_same_vectors(choice):
    """``ctxvec.malloc``: the command starts again under jemalloc (CTXVEC_MALLOC=system: glibc's)."""
    from ctxvec.malloc import in_use, jemalloc_path

    if jemalloc_path() is None or os.environ.get("LD_PRELOAD"):
        pytest.skip("no jemalloc installed (scripts/setup.sh installs it), or an LD_PRELOAD of the user's")
    expected = "jemalloc" if choice == "default" else "system"
    with running_server("seed", env={"CTXVEC_MALLOC": choice}) as (url, proc):
        assert in_use(proc.pid) == expected
        got = embed(url, {"input": TEXTS, "encoding_format": "float"}, headers={}).json()["data"]
    want = ctxvec.load("seed").embed(TEXTS)
    assert np.abs(np.array([d["embedding"] for d in got]) - want).max() < 1e-6


# ---- limits, overload, timeouts, clients that leave ----------------------------------------------

def test_limits_overload_and_recovery(tiny_model):
    with running_server(str(tiny_model), "--max-inputs", "8", "--max-request-bytes", "4000",
                        "--max-queue-tokens", "400") as (url, _):
        too_many = embed(url, {"input": ["x"] * 9}, headers={})
        assert too_many.status_code == 413 and "--max-inputs" in too_many.json()["error"]["message"]
        too_big = embed(url, {"input": "word " * 1000}, headers={})
        assert too_big.status_code == 413 and "--max-request-bytes" in too_big.json()["error"]["message"]
        never_fits = embed(url, {"input": ["word " * 70] * 8}, headers={})  # 8 x 64 tokens, more than the queue
        assert never_fits.status_code == 413 and "--max-queue-tokens" in never_fits.json()["error"]["message"]
        body = {"input": ["light and darkness over the waters " * 5] * 8}  # ~ 300 tokens each request
        with ThreadPoolExecutor(32) as pool:
            responses = list(pool.map(lambda _: embed(url, body, headers={}), range(96)))
        statuses = {r.status_code for r in responses}
        assert statuses <= {200, 429} and 429 in statuses and 200 in statuses
        busy = next(r for r in responses if r.status_code == 429)
        assert int(busy.headers["Retry-After"]) >= 1 and busy.json()["error"]["type"] == "rate_limit_error"
        assert embed(url, body, headers={}).status_code == 200  # recovered


BIG = {"input": ["light and darkness over the waters of the deep " * 6] * 8000}  # 1-3 s of the worker's time
BIG_OK = ("--max-inputs", "8000", "--max-queue-tokens", "1000000")


def start_big_job(url: str):
    """Send BIG from a thread and return once the worker is computing it (its first batch is counted)."""
    slow = ThreadPoolExecutor(1).submit(embed, url, BIG, {})
    deadline = time.monotonic() + 30
    while "ctxvec_batch_texts_count 0.0" in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline and not slow.done()
        time.sleep(0.01)
    return slow


def test_a_request_that_waits_too_long_gets_503_and_its_texts_are_let_go(tiny_model):
    with running_server(str(tiny_model), "--timeout", "0.2", *BIG_OK) as (url, _):
        slow = embed(url, BIG, headers={})  # seconds of the worker's time, more than 0.2 s
        assert slow.status_code == 503 and slow.json()["error"]["code"] == "timeout"
        assert "--timeout" in slow.json()["error"]["message"]
        assert embed(url, {"input": "x"}, headers={}).status_code == 200  # the worker let the big job go
        dropped = re.search(r'ctxvec_dropped_texts_total\{reason="timeout"\} (\d+)', httpx.get(f"{url}/metrics").text)
        assert 1 <= int(dropped.group(1)) < 8000  # the rest of it was never computed


def test_the_texts_of_a_client_that_leaves_are_never_computed(tiny_model):
    with running_server(str(tiny_model), *BIG_OK) as (url, _):
        slow = start_big_job(url)  # the gone client's job waits behind it
        payload = json.dumps({"input": ["gone"] * 5}).encode()
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as raw:
            raw.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            time.sleep(0.2)
        assert slow.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'ctxvec_dropped_texts_total{reason="disconnected"} 5.0' in metrics, metrics


# ---- shutdown: SIGTERM drains, nothing lost or half-answered --------------------------------------

def test_sigterm_finishes_every_request_in_flight_and_exits_0(tiny_model):
    pipeline = ctxvec.load(tiny_model)
    texts = [f"in flight number {i} " + "light and darkness " * (i % 20) for i in range(48)]
    with running_server(str(tiny_model), *BIG_OK) as (url, proc):
        big = start_big_job(url)  # a second or more of the worker's time: the requests below wait in flight
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(embed, url, {"input": texts[i:i + 3] * 40}, {}) for i in range(0, 48, 3)]
            deadline = time.monotonic() + 30
            while "ctxvec_requests_in_flight 18.0" not in httpx.get(f"{url}/metrics").text:  # 16, big, this one
                assert time.monotonic() < deadline and not big.done()
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            try:
                after = embed(url, {"input": "too late"}, headers={}).status_code
            except httpx.TransportError:
                after = "refused"
            responses = [f.result() for f in futures]
        assert big.result().status_code == 200
        assert proc.wait(timeout=30) == 0
    assert after in (503, "refused")
    for i, response in zip(range(0, 48, 3), responses):  # every one answered in full
        assert response.status_code == 200
        got = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
        assert np.abs(got - pipeline.embed(texts[i:i + 3] * 40)).max() < 1e-6


def test_a_request_path_cannot_forge_a_log_line(tiny_model):
    with running_server(str(tiny_model)) as (url, proc):
        assert httpx.get(f"{url}/nothing%0AGET%20/forged%20200").status_code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        log = proc.stderr.read()
    assert "/nothing%0AGET%20/forged%20200 404" in log  # logged as sent, on its one line
    assert not [line for line in log.splitlines() if line.startswith("GET /forged")]


def test_a_port_in_use_is_one_line(tiny_model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "ctxvec", "serve", "--model", str(tiny_model), "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"Error: cannot listen on 127.0.0.1:{port}: address already in use."


@pytest.mark.parametrize("field, bad", [("streams", 0), ("streams", 1.5), ("batch_tokens", 0), ("timeout", -1)])
def test_bad_settings_are_one_clear_error(field, bad):
    from ctxvec.serve import ServeSettings

    with pytest.raises(ValueError, match=f"{field} must be a positive"):
        ServeSettings(**{field: bad})


@pytest.mark.parametrize("budget", [None, 96])
def test_the_workers_budget_is_the_pipelines_unless_set(budget):
    """No --batch-tokens: the server batches by its pipeline's budget (2048 for bf16 on an AMX
    CPU, else 1024), as ``Pipeline.embed`` does; a set one wins."""
    from ctxvec.serve import ServeSettings
    from ctxvec.serve.app import ServerState

    pipeline = ctxvec.load("seed")
    state = ServerState(pipeline, ServeSettings(batch_tokens=budget))
    assert state.worker.batch_tokens == (pipeline.batch_tokens if budget is None else budget)
