"""generate.py --lm-eval against `lm_eval --model hf`: the same tasks on the same folder, timed.
(Not bench/lm_eval.py: a script there would hide the lm_eval package from itself.)

    python bench/lm_evaluation.py [--limit N] [--batch-size B] [--model smollm2|gpt2]

The shipped tasks (data/lm_eval: 4 log-likelihoods per joke, and a few greedy tokens per review
after a 4-shot prompt) run through lm-eval's simple_evaluate twice in this process, once with
nanotune's model (nanotune/tools/lm_eval.py) and once with lm-eval's own `hf` model (transformers)
on the same Hub-layout folder in float32, alternating, best of --repeat. The scores must agree: a
faster run that scores differently would not be a result.
"""
import argparse
import time

import torch
from common import ROOT, checkpoint, matmul_peak, report, smollm2, with_tokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["smollm2", "gpt2"], default="smollm2")
    p.add_argument("--limit", type=int, default=40, help="examples of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from nanotune import load_tokenizer
    from nanotune.models import load_model
    from nanotune.tools.lm_eval import as_lm, find_tasks

    torch.manual_seed(0)
    folder = smollm2() if args.model == "smollm2" else with_tokenizer(checkpoint("124M"))
    names, manager = find_tasks(str(ROOT / "data" / "lm_eval"))
    models = {"nanotune": lambda: as_lm(load_model(folder), load_tokenizer(folder), args.batch_size),
              "lm-eval hf (transformers)": lambda: HFLM(pretrained=str(folder), dtype="float32",
                                                        batch_size=args.batch_size, device="cpu")}
    best, scores = {}, {}
    for _ in range(args.repeat):
        for name, make in models.items():
            lm = make()
            start = time.perf_counter()
            results = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                                      verbosity="ERROR")["results"]
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
            scores[name] = {t: {k: v for k, v in r.items() if "stderr" not in k and k != "alias"}
                            for t, r in results.items()}
    peak = matmul_peak(torch.float32)                 # this machine's speed during the run (it drifts)
    ours, theirs = scores.values()
    if ours != theirs:
        raise SystemExit(f"the scores differ: {ours} against {theirs}")
    reference = best["lm-eval hf (transformers)"]
    rows = [[name, round(seconds, 1), f"{reference / seconds:.2f}x"] for name, seconds in best.items()]
    report(f"lm-eval on the shipped tasks, {args.model}, --limit {args.limit}, batch {args.batch_size};"
           f" {cpu_name()}, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s",
           ["model", "seconds (best of %d)" % args.repeat, "speed vs hf"], rows,
           {"scores": ours, "cpu": cpu_name(), "matmul_peak_flops": peak})


def cpu_name():
    for line in open("/proc/cpuinfo", encoding="utf-8"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
