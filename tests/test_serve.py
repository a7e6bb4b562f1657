"""generate.py --serve speaks the OpenAI API to the official client, batches concurrent requests
without changing their answers, refuses bad requests with the right status, and stops cleanly;
--export-onnx writes a file onnxruntime runs with nanotune's logits and greedy tokens."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ROOT, run_cli

from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.generation import generate

KEY = "test-key"


def start_server(model, *extra):
    env = os.environ | {"NANOTUNE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--model", str(model), "--serve", "--port", "0", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line + proc.stderr.read()
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    return proc, port


@pytest.fixture(scope="module")
def lm_server(tiny_gpt2):
    proc, port = start_server(tiny_gpt2)
    yield port, str(tiny_gpt2)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)


@pytest.fixture()
def client(lm_server):
    from openai import OpenAI
    port, _ = lm_server
    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)


def request(port, method, path, body=None, key=KEY, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request(method, path, body=raw if raw is not None else (json.dumps(body) if body is not None else None), headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if data else None


def greedy_alone(folder, prompt, n):
    model, tok = GPT2.from_pretrained(folder), load_tokenizer(folder)
    return tok.decode(generate(model, [tok.encode(prompt)], n, tok.pad_id, tok.eos_id, temperature=0)[0])


def test_completion_as_the_openai_client_sees_it(client, lm_server):
    _, model = lm_server
    assert [m.id for m in client.models.list().data] == [model]
    r = client.completions.create(model=model, prompt="My grandmother", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    assert r.choices[0].text == greedy_alone(model, "My grandmother", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    tokens = len(load_tokenizer(model).encode("My grandmother"))
    assert r.usage.prompt_tokens == tokens and r.usage.total_tokens == tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 12


def test_streaming_gives_the_same_text(client, lm_server):
    _, model = lm_server
    whole = client.completions.create(model=model, prompt="Why", max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=model, prompt="Why", max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_choices_lists_of_prompts_stop_strings_seeds_and_logprobs(client, lm_server):
    _, model = lm_server
    r = client.completions.create(model=model, prompt=["Why", "My dog"], n=3, max_tokens=8, temperature=1.0)
    assert [c.index for c in r.choices] == list(range(6))
    greedy = greedy_alone(model, "Why", 30)
    stop = greedy[6:9]
    s = client.completions.create(model=model, prompt="Why", max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert s.choices[0].text == greedy[:greedy.find(stop)] and s.choices[0].finish_reason == "stop"
    a, b = (client.completions.create(model=model, prompt="Why", max_tokens=15, temperature=1.0, seed=7).choices[0].text for _ in range(2))
    assert a == b
    lp = client.completions.create(model=model, prompt="Why", max_tokens=5, temperature=0, logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.token_logprobs) == lp.usage.completion_tokens and all(v <= 0 for v in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs) and "".join(logprobs.tokens) == lp.choices[0].text


def test_concurrent_clients_get_what_they_would_get_alone(client, lm_server):
    _, model = lm_server
    prompts = ["Why", "My dog", "The weather forecast said", "A man walks into", "Once upon a time", "I told my", "She", "Two cows"]
    answers = {}

    def ask(p):
        answers[p] = client.completions.create(model=model, prompt=p, max_tokens=16, temperature=0).choices[0].text
    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {p: greedy_alone(model, p, 16) for p in prompts}


@pytest.mark.parametrize("body, status, pattern", [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "Hi", "max_tokens": "ten"}, 400, "'max_tokens' is \"ten\""),
    ({"prompt": "Hi", "temperature": 5}, 400, "from 0 to 2"),
    ({"prompt": 42}, 400, "'prompt' must be"),
    ({"prompt": "Hi", "max_tokens": 1000}, 400, "context is 64 tokens"),
    ({"prompt": "Hi", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
    ({"input": ["hi"]}, 400, None),
])
def test_bad_requests_get_an_error_object(lm_server, body, status, pattern):
    port, _ = lm_server
    path = "/v1/classify" if "input" in (body if isinstance(body, dict) else {}) else "/v1/completions"
    got, answer = request(port, "POST", path, raw=body if isinstance(body, bytes) else None, body=None if isinstance(body, bytes) else body)
    assert got == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert pattern is None or pattern in answer["error"]["message"], answer


def test_keys_size_and_routes(lm_server):
    port, _ = lm_server
    assert request(port, "GET", "/v1/models", key=None)[0] == 401
    assert request(port, "POST", "/v1/completions", {"prompt": "Hi"}, key="wrong")[1]["error"]["code"] == "invalid_api_key"
    assert request(port, "POST", "/v1/completions", raw=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')[0] == 413
    assert request(port, "GET", "/v1/nothing")[0] == 404


def exchange(port, data, timeout=30):
    """Send raw bytes, read until the server closes the connection (or goes quiet), return the HTTP
    status lines the server sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):     # the server answered and closed before the body ended
            pass
        received = b""
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return [line for line in received.decode(errors="replace").split("\r\n") if line.startswith("HTTP/1.1 ")], received


def post_head(extra):
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + KEY.encode() + b"\r\n" + extra + b"\r\n")


def test_adversarial_http_gets_one_clear_answer(lm_server):
    port, _ = lm_server
    # a chunked body is read as one (not its tail taken for a second request)
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    chunked = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    statuses, _ = exchange(port, post_head(b"Transfer-Encoding: chunked\r\nConnection: close\r\n") + chunked, timeout=10)
    assert statuses == ["HTTP/1.1 200 OK"], statuses
    # a negative Content-Length does not lift the size limit: refused before any of the body is read
    statuses, _ = exchange(port, post_head(b"Content-Length: -1\r\n") + b'{"prompt": "' + b"a" * 4096, timeout=10)
    assert statuses == ["HTTP/1.1 400 Bad Request"], statuses
    # deeply nested JSON under the size limit: an error object, and the server goes on
    status, answer = request(port, "POST", "/v1/completions", raw=b"[" * 100_000)
    assert status == 400 and "nested too deeply" in answer["error"]["message"]
    # one request may not decode more sequences at once than --max-batch
    status, answer = request(port, "POST", "/v1/completions", {"prompt": ["Hi"] * 256, "n": 16, "max_tokens": 1})
    assert status == 400 and "4096 sequences" in answer["error"]["message"] and "--max-batch" in answer["error"]["message"]
    # an empty stop string is refused, as generate.py --stop "" is
    status, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi", "stop": ""})
    assert status == 400 and answer["error"]["param"] == "stop"
    assert request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200


def test_a_taken_port_is_one_line(tiny_gpt2):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("generate.py", "--model", tiny_gpt2, "--serve", "--port", port, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--port 0" in lines[0], r.stderr


def test_a_client_that_leaves_mid_stream_does_not_stop_the_others(lm_server, client):
    port, model = lm_server
    body = json.dumps({"prompt": "Why", "max_tokens": 60, "stream": True, "temperature": 1.0}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
                  + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert s.recv(64).startswith(b"HTTP/1.1 200")
    r = client.completions.create(model=model, prompt="My dog", max_tokens=10, temperature=0)
    assert r.choices[0].text == greedy_alone(model, "My dog", 10)


def test_ctrl_c_finishes_the_requests_in_flight(tiny_gpt2):
    proc, port = start_server(tiny_gpt2)
    result = {}
    t = threading.Thread(target=lambda: result.update(answer=request(port, "POST", "/v1/completions", {"prompt": "Why", "max_tokens": 50, "temperature": 0})))
    t.start()
    import time
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    t.join(60)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    status, answer = result["answer"]
    assert status == 200 and answer["choices"][0]["text"] == greedy_alone(tiny_gpt2, "Why", 50)


def test_a_classifier_is_served_on_its_own_route(tmp_path, tiny_bert):
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(tmp_path)
    load_tokenizer(tiny_bert).save(tmp_path)
    proc, port = start_server(tmp_path)
    try:
        status, answer = request(port, "POST", "/v1/classify", {"input": ["Lovely staff!", "Cold soup."]})
        assert status == 200 and [d["index"] for d in answer["data"]] == [0, 1]
        assert set(answer["data"][0]["probabilities"]) == {"negative", "positive"}
        assert abs(sum(answer["data"][1]["probabilities"].values()) - 1) < 1e-5
        assert request(port, "POST", "/v1/completions", {"prompt": "Hi"})[0] == 400
        assert request(port, "POST", "/v1/classify", {"input": []})[0] == 400
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


# ---- ONNX ---------------------------------------------------------------------------------------

def test_export_onnx_gpt2_and_a_classifier(tmp_path, tiny_gpt2, tiny_bert):
    import onnxruntime
    r = run_cli("generate.py", "--model", tiny_gpt2, "--export-onnx", tmp_path / "gpt2.onnx")
    assert r.returncode == 0, r.stderr
    assert "and its 32 greedy tokens are the same" in r.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "gpt2.onnx"))
    ids = torch.randint(0, 500, (4, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = GPT2.from_pretrained(tiny_gpt2)(ids)
    theirs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()})[0]
    assert (ours - torch.from_numpy(theirs)).abs().max() <= 1e-4
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(tmp_path / "clf")
    load_tokenizer(tiny_bert).save(tmp_path / "clf")
    r = run_cli("generate.py", "--model", tmp_path / "clf", "--export-onnx", tmp_path / "clf.onnx")
    assert r.returncode == 0 and "differ from nanotune's by at most" in r.stdout, r.stderr
    again = run_cli("generate.py", "--model", tmp_path / "clf", "--export-onnx", tmp_path / "clf.onnx")
    assert again.returncode == 2 and "already exists" in again.stderr


# ---- the engine: continuous batching -----------------------------------------------------------------

def run_engine(engine, requests, on_event=None):
    """Submit (prompts, settings) requests together; wait for all; return each one's sequences."""
    from nanotune.tools.engine import Request
    done, lock = threading.Event(), threading.Lock()
    left = [sum(len(p) * s["n"] for p, s in requests)]

    def emit(kind, seq):
        if on_event is not None:
            on_event(kind, seq)
        if kind == "done":
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()
    work = [Request(p, s, emit) for p, s in requests]
    for w in work:
        engine.submit(w)
    assert done.wait(120)
    return [[s.tokens for s in w.sequences] for w in work]


def settings(**kw):
    return {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": [], "seed": None, "logprobs": None} | kw


def test_different_settings_decode_together_and_each_gets_what_it_would_alone(tiny_gpt2):
    from nanotune.tools.engine import Engine
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    greedy = ([tok.encode("My dog"), tok.encode("Why")], settings())
    seeded = ([tok.encode("Once upon a time")], settings(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=20))
    engine = Engine(model, tok, 8, {tok.eos_id})
    together = run_engine(engine, [greedy, seeded])
    alone = [run_engine(engine, [greedy])[0], run_engine(engine, [seeded])[0]]
    engine.stop()
    assert together == alone
    assert together[0] == [generate(model, [p], 12, tok.pad_id, tok.eos_id, temperature=0)[0] for p in greedy[0]]
    assert together[1][0] != together[1][1]                          # n=2 with one seed: two different draws


def test_a_request_that_arrives_mid_batch_starts_before_the_batch_ends(tiny_gpt2):
    from nanotune.tools.engine import Engine, Request
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    events, started = [], threading.Event()

    def note(name):
        def emit(kind, seq):
            events.append((name, kind))
            if name == "long" and len(seq.tokens) == 5:
                started.set()
        return emit
    for continuous in (True, False):
        events.clear(), started.clear()
        engine = Engine(model, tok, 4, set(), continuous=continuous)      # no stop token: every sequence runs its length
        engine.submit(Request([tok.encode("A long story")], settings(max_tokens=50), note("long")))
        assert started.wait(60)
        engine.submit(Request([tok.encode("A short one")], settings(max_tokens=3), note("short")))
        engine.stop()                                                   # finishes both first
        first_short, long_done = events.index(("short", "token")), events.index(("long", "done"))
        assert (first_short < long_done) == continuous, (continuous, events)


def test_the_cache_grows_only_by_what_the_running_sequences_need(tiny_gpt2):
    from nanotune.tools.engine import Engine
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    prompt = tok.encode("Once upon a time")
    engine = Engine(model, tok, 8, set())
    shapes = set()
    run_engine(engine, [([prompt] * 8, settings(max_tokens=12))],          # 8 places, each prompt + 12 positions
               on_event=lambda kind, seq: shapes.add(tuple(engine.k.shape)))
    engine.stop()
    slots, positions = max(shape[1] for shape in shapes), max(shape[3] for shape in shapes)
    assert slots == 8 and positions == len(prompt) + 12                 # more places, not longer ones


def test_a_cancelled_request_frees_its_place(tiny_gpt2):
    from nanotune.tools.engine import Engine, Request
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    engine = Engine(model, tok, 1, set())
    gone = Request([tok.encode("A long story")], settings(max_tokens=60), lambda kind, seq: None)
    engine.submit(gone)
    gone.cancelled = True                                               # the client went away
    answered = run_engine(engine, [([tok.encode("Next")], settings(max_tokens=4))])
    engine.stop()
    assert len(answered[0][0]) == 4 and gone.sequences[0].finish_reason == "cancelled"
    assert len(gone.sequences[0].tokens) < 60


def test_health_and_chat_completions_as_the_openai_client_sees_them(tmp_path, tiny_llama):
    from openai import OpenAI
    import shutil as sh
    folder = tmp_path / "chat"
    sh.copytree(tiny_llama, folder)
    proc, port = start_server(folder, "--chat-template", "chatml")
    try:
        assert request(port, "GET", "/health", key=None) == (200, {"status": "ok"})
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke about cats."}]
        r = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=12, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=str(folder), messages=messages, max_tokens=12, temperature=0, stream=True))
        assert streamed == r.choices[0].message.content
        cli = run_cli("generate.py", "--model", folder, "--chat-template", "chatml", "--system", "Be brief.",
                      "--prompt", "Tell me a joke about cats.", "--temperature", 0, "--max-new-tokens", 12)
        assert cli.returncode == 0 and cli.stdout.strip() == r.choices[0].message.content.strip(), cli.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
