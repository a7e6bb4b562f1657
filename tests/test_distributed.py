"""Ways of splitting one optimizer step that must not change it: torchrun ranks (DDP, FSDP, 2 CPU
ranks with Gloo), gradient accumulation, gradient checkpointing."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DATA, ROOT, make_gpt2, run_cli

from nanotune import GPT2


def torchrun(*args, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"), *map(str, args)]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def no_dropout_gpt2(tmp_path_factory, bpe_dir):
    """Dropout off, so that one process and two ranks draw no different random numbers."""
    return make_gpt2(tmp_path_factory.mktemp("gpt2-nodrop"), bpe_dir, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(scope="module")
def eight_lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "eight.txt"
    path.write_text("\n".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:8]) + "\n")
    return path


def test_two_ranks_of_4_equal_one_process_of_8(tmp_path, no_dropout_gpt2, eight_lines):
    # fp32: the bound is fp32 rounding (bf16 autocast, the default on some CPUs, rounds each product to 8 bits).
    # lr 1e-3: Adam's first step magnifies the rounding of gradients near 1e-8 to a thousandth of lr (see below);
    # at lr 1e-2 an AVX2 CPU's summation order moved one weight by 1.07e-5.
    common = ["--model", no_dropout_gpt2, "--data", eight_lines, "--val-split", 0, "--epochs", 1, "--lr", 1e-3, "--fp32"]
    one = run_cli("train.py", *common, "--batch-size", 8, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = torchrun(*common, "--batch-size", 4, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    assert "1 steps on each of 2 ranks" in two.stdout and two.stdout.count("model:") == 1   # rank 0 alone prints
    a, b = GPT2.from_pretrained(tmp_path / "one"), GPT2.from_pretrained(tmp_path / "two")
    start = GPT2.from_pretrained(no_dropout_gpt2)
    for (name, p), q, p0 in zip(a.named_parameters(), b.parameters(), start.parameters()):
        assert not torch.equal(p, p0), name                       # one real step was taken
        assert (p - q).abs().max() <= 1e-5, name


def test_two_rank_run_resumes_in_one_process(tmp_path, tiny_gpt2):
    common = ["--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 2, "--lr", 1e-3, "--out", tmp_path / "out"]
    r = torchrun(*common, "--stop-after-epochs", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("stopped after epoch 1") == 1 and len((tmp_path / "out/metrics.jsonl").read_text().splitlines()) > 0
    resumed = run_cli("train.py", *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at epoch 2" in resumed.stdout and "epoch 2: validation loss" in resumed.stdout


def test_fsdp_two_ranks_train_and_save_a_loadable_model(tmp_path, tiny_gpt2):
    r = torchrun("--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-3, "--fsdp", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    model = GPT2.from_pretrained(tmp_path / "out")
    start = GPT2.from_pretrained(tiny_gpt2)
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids)).all()


def test_fsdp_stopped_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path, tiny_gpt2):
    """Each rank saves its shard of the weights and of AdamW's moments (torch.distributed.checkpoint)
    and its own random state; the resumed run ends where the uninterrupted one does."""
    common = ["--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--val-split", 0, "--epochs", 2, "--lr", 1e-3, "--fp32", "--fsdp"]
    env = {"MKL_CBWR": "AUTO"}
    full = torchrun(*common, "--out", tmp_path / "full", env=env)
    assert full.returncode == 0, full.stderr
    part = torchrun(*common, "--out", tmp_path / "part", "--stop-after-epochs", 1, env=env)
    assert part.returncode == 0 and "stopped after epoch 1" in part.stdout, part.stderr
    assert sorted(os.listdir(tmp_path / "part/checkpoint/sharded-a")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = torchrun(*common, "--out", tmp_path / "part", "--resume", env=env)
    assert resumed.returncode == 0 and "resuming at epoch 2" in resumed.stdout, resumed.stderr
    state = torch.load(tmp_path / "part/checkpoint/training_state.pt", weights_only=True)
    assert state["sharded"] == "sharded-b" and len(state["rng"]) == 2      # the newer shards; each rank's random state
    a, b = GPT2.from_pretrained(tmp_path / "full"), GPT2.from_pretrained(tmp_path / "part")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() <= 1e-6, name
    plain = run_cli("train.py", *[c for c in common if c != "--fsdp"], "--out", tmp_path / "part", "--resume")
    assert plain.returncode == 2 and "saved with --fsdp" in plain.stderr, plain.stderr


@pytest.mark.parametrize("variant", [["--batch-size", 4, "--grad-accum", 2], ["--batch-size", 8, "--grad-checkpointing"]])
def test_accumulation_and_checkpointing_change_nothing(tmp_path, no_dropout_gpt2, eight_lines, variant):
    """One step of 2 micro-batches of 4 (loss averaged over the real tokens of both), or with
    activations recomputed in backward, gives the weights of one plain batch of 8. (The gradients
    agree to ~1e-7 relative; Adam's first step, lr * g / (|g| + 1e-8), magnifies the rounding of
    gradients near 1e-8 to a few thousandths of lr, hence lr 1e-3 for a 1e-5 bound.)"""
    common = ["--model", no_dropout_gpt2, "--data", eight_lines, "--val-split", 0, "--epochs", 1, "--lr", 1e-3, "--fp32"]   # as above
    plain = run_cli("train.py", *common, "--batch-size", 8, "--out", tmp_path / "plain")
    other = run_cli("train.py", *common, *variant, "--out", tmp_path / "other")
    assert plain.returncode == 0 and other.returncode == 0, other.stderr
    a, b = GPT2.from_pretrained(tmp_path / "plain"), GPT2.from_pretrained(tmp_path / "other")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p - q).abs().max() <= 1e-5, name


def test_lora_classifier_under_two_ranks(tmp_path, tiny_bert):
    """DDP with LoRA: only the adapters and the head have gradients to average."""
    r = torchrun("--model", tiny_bert, "--data", "sentiment_train.csv", "--val-data", "sentiment_val.csv", "--lora-r", 4,
                 "--epochs", 1, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "validation accuracy" in r.stdout and (tmp_path / "out/adapter_model.safetensors").is_file()


def test_the_shards_description_is_never_unpickled_freely(tmp_path):
    """DCP describes its shards in a pickle; nanotune reads it allowing only the description's classes."""
    import pickle

    from nanotune.run.checkpoint import CheckpointDescription

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not part of a checkpoint"):
        CheckpointDescription(open(tmp_path / ".metadata", "rb")).load()
    assert not (tmp_path / "pwned").exists()
