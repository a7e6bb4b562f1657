"""The memory estimate train.py prints before a run: near the peak the run measures, on a small grid (the 124M grid is bench/memory.py's); --dry-run writes nothing; a run that would not
fit is refused before the model is loaded, with settings that would fit."""
import json

import pytest
import torch
from conftest import make_gpt2, run_cli

import train
from nanotune import NanotuneError
from nanotune.run import memory
from nanotune.run.train_flags import Run
from nanotune.gpt2 import GPT2Config
from nanotune.hub import config_to_dict


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory, bpe_dir):
    """Wide and long enough that activations, not the libraries, decide the peak."""
    return make_gpt2(tmp_path_factory.mktemp("small-gpt2"), bpe_dir, n_embd=128, n_layer=4, n_head=4, n_positions=512)


@pytest.mark.parametrize("flags", [
    ["--fp32"],                                               # full fine-tuning
    ["--bf16", "--grad-checkpointing", "--lora-r", "8"],
    ["--quantize", "4bit"],
    ["--quantize", "8bit", "--grad-checkpointing"],           # bitsandbytes keeps each layer's input on its context
])
def test_the_estimate_is_within_20_percent_of_the_measured_peak(small_gpt2, tmp_path, flags):
    r = run_cli("train.py", "--model", small_gpt2, "--data", "anecdotes_jokes.txt", "--pack", "--max-length", 512,
                "--batch-size", 8, "--epochs", 1, "--out", tmp_path / "out", *flags)
    assert r.returncode == 0, r.stderr
    assert "memory: the run's peak, estimated before loading the model (batches of 8 x 512 tokens)" in r.stdout
    for part in ("weights", "gradients", "optimizer state", "activations kept for backward", "dropout masks", "output layer: logits"):
        assert part in r.stdout
    events = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    m = next(e for e in events if e["event"] == "memory")
    # The target is 20 %; the measured peak of the same run varies by up to a tenth from one run to
    # the next (where the allocator happens to place freed blocks), so one run is held to 25 %.
    assert abs(m["error"]) <= 0.25, m
    assert f"memory: peak {m['measured_mib']:,} MiB measured" in r.stdout


def test_dry_run_prints_the_estimate_and_the_batch_and_writes_nothing(small_gpt2, tmp_path):
    r = run_cli("train.py", "--model", small_gpt2, "--data", "anecdotes_jokes.txt", "--dry-run", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "memory: the run's peak" in r.stdout and "example 1 of the first batch" in r.stdout and "padding: " in r.stdout
    assert not (tmp_path / "out").exists()


def test_checkpointing_and_quantization_lower_the_estimate():
    config = config_to_dict(GPT2Config())                    # the 124M architecture
    plain = memory.estimate(config, 8, 1024, baseline=0)
    assert plain["total with --grad-checkpointing"] < 0.6 * plain["total"]
    ckpt = memory.estimate(config, 8, 1024, baseline=0, checkpointing=True)
    assert ckpt["total"] == pytest.approx(plain["total with --grad-checkpointing"], rel=1e-6)


def test_the_inputs_bitsandbytes_keeps_on_its_context_are_counted_under_checkpointing():
    from nanotune.lora import DEFAULT_TARGETS, LoRAConfig
    from nanotune.quantize import QuantConfig
    config, lora, kept = config_to_dict(GPT2Config()), LoRAConfig(DEFAULT_TARGETS["gpt2"]), "activations kept for backward (--grad-checkpointing)"
    fp32 = memory.estimate(config, 8, 128, lora=lora, checkpointing=True, baseline=0)
    int8 = memory.estimate(config, 8, 128, quant=QuantConfig("8bit"), lora=lora, checkpointing=True, baseline=0)
    # checkpointing drops saved tensors, but each 8-bit layer holds its input (fp32) on its autograd
    # context: per block three (B, T, C) and one (B, T, 4C)
    assert int8[kept] - fp32[kept] == pytest.approx(12 * 7 * 8 * 128 * 768 * 4, rel=0.05)


def test_a_run_that_would_not_fit_is_refused_with_settings_that_would(monkeypatch):
    config = config_to_dict(GPT2Config())
    needed = memory.estimate(config, 8, 1024)["needed"]
    monkeypatch.setattr(memory, "free_memory", lambda device: 0.6 * needed)
    args = train.parse_args(["--data", "anecdotes_jokes.txt", "--batch-size", "8"])
    report = {"lengths": {"max": 1024, "max_length": 1024}}
    with pytest.raises(NanotuneError, match=r"needs about .* MiB more but cpu has .* MiB free: try --grad-checkpointing") as e:
        run = Run(torch.device("cpu"), 0, 1, False, "gpt2", "lm", None, None, None)
        memory.check(args, run, config, report, 0)
    suggested = int(str(e.value).rsplit("about ", 1)[1].split(" MiB")[0].replace(",", ""))
    assert suggested * memory.MiB - memory.rss_now() <= 0.6 * needed


def long_pairs(path, n=16):
    """Plain-text preference pairs long enough that activations, not the libraries, decide the peak."""
    from conftest import ROOT
    words = (ROOT / "data/anecdotes_jokes.txt").read_text().split() * 4
    rows = [{"prompt": " ".join(words[i * 300:i * 300 + 60]),
             "chosen": " " + " ".join(words[i * 300 + 60:i * 300 + 180]),
             "rejected": " " + " ".join(words[i * 300 + 180:i * 300 + 300])} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("flags", [["--lora-r", "8"], ["--reward-model"]], ids=["dpo-lora", "reward-model"])
def test_the_estimate_knows_preference_pairs(small_gpt2, tmp_path, flags):
    data = long_pairs(tmp_path / "pairs.jsonl")
    r = run_cli("train.py", "--model", small_gpt2, "--data", data, "--max-length", 512, "--batch-size", 4, "--fp32",
                "--epochs", 1, "--val-split", 0, "--out", tmp_path / "out", *flags)
    assert r.returncode == 0, r.stderr
    # two rows a pair (the chosen and the rejected answer), and no dropout (preference tuning turns it off)
    assert "(batches of 8 x " in r.stdout and "dropout masks" not in r.stdout
    reward_model = "--reward-model" in flags
    assert ("output layer" in r.stdout) != reward_model                  # a reward model's head reads no logits
    assert ("the reference's pass" in r.stdout) != reward_model          # DPO under LoRA: the adapters-off pass
    events = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    m = next(e for e in events if e["event"] == "memory")
    assert abs(m["error"]) <= 0.25, m
