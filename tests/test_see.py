"""Seeing what you train: the batch view, the LR range test, the training plot, discriminative
learning rates, gradual unfreezing and the one-cycle schedule."""
import json

import pytest
import torch
from conftest import run_cli

import train
from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.tools.batch_view import batch_notes, show_batch
from nanotune.data import classify_batch, lm_batch, truncate
from nanotune.tools.lr_find import lr_range_test, suggestions
from nanotune.optim import depth, make_optimizer, one_cycle, unfreeze_gradually


def test_the_lm_batch_view_matches_the_tensors(tiny_gpt2):
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(["Why did the cow cross?", "Moo."])], tok.pad_id)
    text = show_batch(batch, tok, "lm", 2, colour=False, notes=batch_notes(batch, tok, "lm", 0, 64, 0, False, "head"))
    rows = [line for line in text.splitlines() if line[:6].strip().isdigit()]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert len(rows) == ids.numel()                                          # a row for every position of both examples
    for row, (b, t) in zip(rows, [(b, t) for b in range(2) for t in range(ids.shape[1])]):
        assert int(row[:6]) == t
        assert f" {int(ids[b, t])} " in row and f" {int(mask[b, t])}  " in row
        scored = t + 1 < ids.shape[1] and labels[b, t + 1] != -100            # position t is scored on token t + 1
        assert ("* " in row) == bool(scored) and ("not scored" in row) == (not scored)
        if scored:
            assert row.rstrip().endswith(f"({int(labels[b, t + 1])})")
    assert "padding uses the end-of-text token" in text and "still scored (2 in this batch)" in text


def test_the_classification_view_shows_label_and_truncation(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    long = "a very long review that goes on and on about the soup and the staff and the chairs and the room"
    ids = [truncate(s, 8, "head") for s in tok.encode_batch([long, "great"])]
    batch = classify_batch(ids, [0, 1], tok.pad_id)
    notes = batch_notes(batch, tok, "classify", 1, 8, len(tok.encode(long)) - 8, False, "head")
    text = show_batch(batch, tok, "classify", 2, ["negative", "positive"], colour=False, notes=notes)
    assert "label: negative (id 0)" in text and "label: positive (id 1)" in text
    assert "[CLS]" in text and text.count("[SEP]") >= 2
    assert f"were truncated (head): {len(tok.encode(long)) - 8:,} tokens the model never sees" in text


def test_show_batch_on_the_command_line_writes_nothing(tmp_path, tiny_gpt2):
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--show-batch", "--out", tmp_path / "o")
    assert r.returncode == 0 and "example 2 of the first batch" in r.stdout and "example 3" not in r.stdout, r.stderr
    assert not (tmp_path / "o").exists()


def test_the_lr_range_test_restores_everything_and_suggests_a_falling_point(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2).train()
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(["Why did the cow cross the road?", "To get to the udder side."])], tok.pad_id)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()

    def step(lr):
        total, count, _ = train.train_step(model, [batch], optimizer, lr, "lm", 1.0, torch.device("cpu"))
        return float(total) / count
    result = lr_range_test(model, optimizer, step, steps=60)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())      # the weights, exactly
    assert optimizer.state_dict()["state"] == {} and torch.equal(torch.get_rng_state(), rng)
    assert result["lr"][0] == pytest.approx(1e-7) and all(a < b for a, b in zip(result["lr"], result["lr"][1:]))
    s = suggestions(result)
    smooth = result["smoothed"]
    for key in ("steepest_index", "valley_index"):
        i = s[key]
        assert smooth[i + 1] < smooth[i - 1], key                             # the smoothed loss is falling there


def test_lr_find_and_the_training_plot_on_the_command_line(tmp_path, tiny_gpt2):
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--lr-find", "--out", tmp_path / "find")
    assert r.returncode == 0, r.stderr
    assert "suggested learning rate:" in r.stdout and "ten times too high" in r.stdout
    assert (tmp_path / "find" / "lr_find.png").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "find" / "model.safetensors").exists()
    out = tmp_path / "run"
    t = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 2, "--out", out)
    assert t.returncode == 0, t.stderr
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert all(s["grad_norm"] > 0 and 0 <= s["clipped"] <= 1 for s in steps)


def test_discriminative_rates_follow_the_formula(tiny_bert):
    model = BertClassifier.from_pretrained(tiny_bert)
    optimizer = make_optimizer(model, 1e-3, 0.01, lr_decay=0.5)
    n = model.config.num_hidden_layers                                      # 2: head 1e-3, block 1 5e-4, block 0 2.5e-4, embeddings 1.25e-4
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert group["lr_scale"] == 0.5 ** (n + 1 - depth(names[id(p)], n))
    scales = {g["name"]: g["lr_scale"] for g in optimizer.param_groups}
    assert scales == {"head": 1.0, "block 1": 0.5, "block 0": 0.25, "embeddings": 0.125}
    assert {depth("bert.encoder.layer.1.attention.self.query.lora_A.weight", 2), depth("classifier.weight", 2),
            depth("bert.embeddings.LayerNorm.weight", 2)} == {2, 3, 0}
    ids = torch.tensor([[101, 2000, 102]])
    train.train_step(model.train(), [{"input_ids": ids, "attention_mask": None, "labels": torch.tensor([1])}], optimizer, 1e-3,
                     "classify", 0.0, torch.device("cpu"))
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["block 0"] == pytest.approx(2.5e-4)


def test_gradual_unfreezing_leaves_frozen_blocks_bit_identical(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2).train()
    tok = load_tokenizer(tiny_gpt2)
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(["Why did the cow cross the road?"])], tok.pad_id)
    optimizer = make_optimizer(model, 1e-2, 0.01)
    trainable = list(model.named_parameters())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lowest = unfreeze_gradually(model, trainable, 0)                     # epoch 1: ln_f and the last block (block 1)
    assert lowest == 2
    train.train_step(model, [batch], optimizer, 1e-2, "lm", 1.0,
                     torch.device("cpu"))
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p)
        assert moved == (name.startswith(("transformer.h.1.", "transformer.ln_f."))), name
    assert unfreeze_gradually(model, trainable, 1) == 1 and unfreeze_gradually(model, trainable, 5) == 0


def test_gradual_unfreezing_resumes_with_the_right_set(tmp_path, tiny_gpt2):
    args = ["--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 3, "--unfreeze", "gradual", "--lr", 1e-3,
            "--out", tmp_path / "out"]
    first = run_cli("train.py", *args, "--stop-after-epochs", 1)
    assert first.returncode == 0 and "epoch 1: training from block 1 up" in first.stdout, first.stderr
    resumed = run_cli("train.py", *args, "--resume")
    assert resumed.returncode == 0 and "epoch 2: training from block 0 up" in resumed.stdout and "epoch 3: training everything" in resumed.stdout


@pytest.mark.parametrize("total, warmup", [(100, 0), (37, 0), (50, 10)])
def test_one_cycle_is_what_onecycle_lr_computes(total, warmup):
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([p], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=total, pct_start=warmup / total if warmup else 0.3,
                                                    cycle_momentum=False)
    for step in range(total):
        assert one_cycle(step, 1e-3, warmup, total) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        if step < total - 1:
            scheduler.step()
