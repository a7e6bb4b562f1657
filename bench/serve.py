"""generate.py --serve under arriving load: time to first token, time per output token and
completions per second, for continuous batching (the server's engine) against the same engine
running each batch to its end (admitting newcomers only when every running sequence has ended, as
the server did before) and against one request at a time (--max-batch 1).

    python bench/serve.py [--quick] [--model gpt2|smollm2]

Requests arrive at random times (a Poisson process, fixed seed) at a few rates, and from 16 clients
in a closed loop (each sends its next request when its answer is in). Every request streams its
answer (128 new tokens, sampling at temperature 0.8), so the first token's arrival is measured.
The server runs in its own process (this script with --server); the clients are threads here.
"""
import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import threading
import time

from common import ROOT, checkpoint, matmul_peak, report, smollm2, with_tokenizer

MODES = {"continuous": (32, True), "batch to the end": (32, False), "one at a time": (1, True)}


def server(folder, mode):
    """--server: the app on uvicorn, with the engine in `mode`, on a free port (printed)."""
    sys.path.insert(0, str(ROOT))
    import uvicorn

    from nanotune import load_tokenizer
    from nanotune.models import load_model
    from nanotune.tools.serve import app
    max_batch, continuous = MODES[mode]
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)
    application, _ = app(model, tokenizer, "bench", max_batch=max_batch, continuous=continuous)
    config = uvicorn.Config(application, host="127.0.0.1", port=0, log_level="warning")
    s = uvicorn.Server(config)
    import socket
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(sock.getsockname()[1], flush=True)
    s.run(sockets=[sock])


def one_request(port, prompt, max_tokens):
    """(seconds to the first token, seconds for the whole answer, tokens) of one streamed completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_p": 0.95, "stream": True})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response, first, pieces = conn.getresponse(), None, 0
    for line in response:
        if line.startswith(b"data: {") and b'"text": ""' not in line:
            first = first or time.perf_counter() - start
            pieces += 1
    conn.close()
    return first or time.perf_counter() - start, time.perf_counter() - start, pieces


def arriving(port, rate, count, max_tokens, seed=0):
    """`count` requests arriving as a Poisson process of `rate` a second; each on its own thread."""
    rng, results, threads = random.Random(seed), [], []
    start = time.perf_counter()
    for i in range(count):
        t = threading.Thread(target=lambda i=i: results.append(one_request(port, f"Request {i}: once upon a time",
                                                                           max_tokens)))
        t.start()
        threads.append(t)
        time.sleep(rng.expovariate(rate))
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def closed_loop(port, clients, per_client, max_tokens):
    results, threads = [], []

    def client(i):
        for j in range(per_client):
            results.append(one_request(port, f"Request {i}.{j}: once upon a time", max_tokens))
    start = time.perf_counter()
    for i in range(clients):
        threads.append(threading.Thread(target=client, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def summary(results, elapsed):
    firsts = sorted(r[0] for r in results)
    per_token = [(r[1] - r[0]) / max(r[2] - 1, 1) for r in results]
    p = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]
    return [f"{p(firsts, 0.5):.3f}", f"{p(firsts, 0.95):.3f}", f"{1000 * statistics.median(per_token):.1f}",
            f"{len(results) / elapsed:.2f}"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer and shorter requests")
    parser.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    parser.add_argument("--server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.server:
        return server(*args.server)
    folder = smollm2() if args.model == "smollm2" else with_tokenizer(checkpoint("tiny" if args.quick else "124M"))
    max_tokens, count, per_client = (16, 16, 1) if args.quick else (128, 24, 2)
    rates = (1.0, 4.0) if args.quick else (0.5, 1.0, 2.0)
    peak = matmul_peak(__import__("torch").float32) / 1e9
    rows = []
    for mode in MODES:
        proc = subprocess.Popen([sys.executable, __file__, "--server", str(folder), mode], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        port = int(proc.stdout.readline())
        one_request(port, "warm up", 4)
        for rate in rates:
            rows.append([mode, f"Poisson, {rate:g} requests/s", *summary(*arriving(port, rate, count, max_tokens))])
            print(rows[-1], flush=True)
        rows.append([mode, "16 clients, closed loop", *summary(*closed_loop(port, 16, per_client, max_tokens))])
        print(rows[-1], flush=True)
        proc.terminate()
        proc.wait()
    name = "SmolLM2-135M" if args.model == "smollm2" else f"GPT-2 {'tiny' if args.quick else '124M'}"
    report(f"Serving {name}, {max_tokens} new tokens a request, streamed; matmul peak fp32 {peak:,.0f} GFLOP/s",
           ["server", "load", "first token p50 s", "first token p95 s", "ms per output token", "completions/s"], rows)


if __name__ == "__main__":
    main()
