"""generate.py --serve under load: completions per second and latency for 1, 4 and 16 concurrent
clients, batched (the default) against the same requests served one at a time (--max-batch 1).

    python bench/serve.py [--quick]

GPT-2 124M architecture (random weights), 128 new tokens a request, sampling (temperature 0.8,
top_p 0.95). Each client sends its requests one after another (a closed loop), so with N clients
N requests are waiting at once. The server runs in its own process; the clients are threads here.
"""
import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time

import torch
from common import ROOT, checkpoint, matmul_peak, report, with_tokenizer


def start(folder, max_batch):
    proc = subprocess.Popen([sys.executable, str(ROOT / "generate.py"), "--model", str(folder), "--serve", "--port", "0",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    return proc, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def load(port, clients, per_client, max_tokens):
    """(completions per second, p50 latency, p95 latency, new tokens per second)."""
    latencies, tokens = [], []

    def client(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        for j in range(per_client):
            body = json.dumps({"prompt": f"Request {i}.{j}: once upon a time", "max_tokens": max_tokens,
                               "temperature": 0.8, "top_p": 0.95})
            start = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
            latencies.append(time.perf_counter() - start)
            tokens.append(answer["usage"]["completion_tokens"])
        conn.close()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return len(latencies) / elapsed, statistics.median(latencies), q[18], sum(tokens) / elapsed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="tiny model, 16 new tokens")
    args = p.parse_args()
    size, max_tokens = ("tiny", 16) if args.quick else ("124M", 128)
    folder = with_tokenizer(checkpoint(size))
    peak = matmul_peak(torch.float32) / 1e9
    rows, one = [], {}
    for clients in (1, 4, 16):
        per_client = 2 if clients > 1 else 4
        for label, max_batch in (("one at a time", 1), ("batched", 32)):
            proc, port = start(folder, max_batch)
            try:
                load(port, 1, 1, 4)                       # warm up
                per_s, p50, p95, tok_s = load(port, clients, per_client, max_tokens)
            finally:
                proc.terminate()
                proc.wait()
            if label == "one at a time":
                one[clients] = per_s
            rows.append([clients, label, clients * per_client, per_s, tok_s, p50, p95, f"{per_s / one[clients]:.2f}x"])
            print(rows[-1], flush=True)
    report(f"Serving GPT-2 {size}, {max_tokens} new tokens a request (fp32, matmul peak {peak:,.0f} GFLOP/s)",
           ["clients", "server", "requests", "completions/s", "new tokens/s", "p50 latency s", "p95 latency s", "vs one at a time"],
           rows, {"matmul_peak_gflops_fp32": peak})


if __name__ == "__main__":
    main()
