"""train.py: the loss, learning, exact resume, safe saving, and clear errors for bad input."""
import hashlib
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import DATA, ROOT, run_cli

import train
from nanotune import GPT2, NanotuneError, load_tokenizer
from nanotune.data import batch_order, lm_batch, padding_note, padding_share
from nanotune.files import atomic_write
from nanotune.losses import causal_lm_loss


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lm_loss_equals_transformers(tiny_gpt2):
    from transformers import GPT2LMHeadModel
    tok = load_tokenizer(tiny_gpt2)
    texts = ["A man walks into a library.", "Short.", "Why did the tomato blush? It saw the salad dressing."]
    batch = lm_batch([ids + [tok.eos_id] for ids in tok.encode_batch(texts)], tok.pad_id)
    assert batch["labels"][1].tolist().count(-100) > 0           # padding is not scored...
    assert (batch["labels"] == tok.eos_id).sum() == 3            # ...but every real EOS is
    ours, ref = GPT2.from_pretrained(tiny_gpt2), GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    with torch.no_grad():
        loss = causal_lm_loss(ours(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        expected = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    assert abs(loss.item() - expected.item()) < 1e-5


def test_tiny_gpt2_overfits_a_few_lines(tmp_path, tiny_gpt2):
    data = tmp_path / "four.txt"
    data.write_text("\n".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:4]))
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", data, "--val-split", 0, "--epochs", 150, "--lr", 1e-2,
                "--batch-size", 4, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    losses = [m["loss"] for m in metrics(tmp_path / "out") if m["event"] == "train"]
    assert losses[0] > 5.0 and losses[-1] < 0.5


def test_classifier_learns_sentiment_on_real_minilm(tmp_path, minilm_dir):
    r = run_cli("train.py", "--model", minilm_dir, "--data", "sentiment_train.csv", "--val-data", "sentiment_val.csv",
                "--epochs", 3, "--lr", 1e-4, "--batch-size", 16, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "initialised it randomly" in r.stdout
    final = [m for m in metrics(tmp_path / "out") if m["event"] == "eval"][-1]
    assert final["accuracy"] >= 0.8 and final["macro_f1"] >= 0.8, final      # chance is 0.5
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    ref = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    enc = AutoTokenizer.from_pretrained(tmp_path / "out")(["A wonderful, friendly place.", "Cold food and rude staff."], padding=True, return_tensors="pt")
    assert ref(**enc).logits.argmax(-1).tolist() == [1, 0]


def common_args(model, out, *extra):
    return ["--model", model, "--data", "anecdotes_jokes.txt", "--epochs", 2, "--lr", 1e-3, "--out", out, *extra]


@pytest.mark.parametrize("order", [[], ["--group-by-length"]])
def test_resume_after_an_epoch_gives_the_same_weights(tmp_path, tiny_gpt2, monkeypatch, order):
    """Dropout is on, the data is shuffled: an exact resume must restore RNG state and data order."""
    # MKL's matrix products may take a different path for differently aligned memory (the resumed
    # process allocates its tensors elsewhere); a last-bit difference that AdamW then amplifies
    # failed this comparison once in about ten runs here. Its reproducible mode always takes one path.
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    full = run_cli("train.py", *common_args(tiny_gpt2, tmp_path / "full", *order))
    assert full.returncode == 0, full.stderr
    first = run_cli("train.py", *common_args(tiny_gpt2, tmp_path / "split", "--stop-after-epochs", 1, *order))
    assert first.returncode == 0 and "continue with the same command plus --resume" in first.stdout
    second = run_cli("train.py", *common_args(tiny_gpt2, tmp_path / "split", "--resume", *order))
    assert second.returncode == 0, second.stderr
    a = torch.load(tmp_path / "full/checkpoint/training_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/checkpoint/training_state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert len([m for m in metrics(tmp_path / "split") if m["event"] == "eval"]) == 2


def test_train_py_says_how_much_padding_grouping_by_length_would_save():
    lengths = torch.randint(1, 200, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    note = padding_note(lengths, 8, 42, grouped=False, packed=False)
    plain, grouped = map(int, re.findall(r"(\d+)%", note))
    assert "with --group-by-length" in note and grouped * 5 < plain
    note = padding_note(lengths, 8, 42, grouped=True, packed=False)
    assert note.startswith(f"padding: {grouped}% ") and f"{plain}% without it" in note
    assert padding_note(lengths, 8, 42, grouped=False, packed=True) == "padding: none (--pack)"


def test_group_by_length_batches_similar_lengths_and_keeps_every_example_once():
    lengths = torch.randint(1, 200, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = batch_order(1000, 8, 3, 1)
    grouped = batch_order(1000, 8, 3, 1, lengths=lengths)
    assert sorted(i for batch in grouped for i in batch) == list(range(1000))
    assert padding_share(lengths, grouped) < padding_share(lengths, plain) / 5
    few = [[0, 1], [2]]                                                      # 2 + 5 padded to 5 and 3 alone: 3 of 13
    assert padding_share([2, 5, 3], few) == pytest.approx(3 / 13)
    assert grouped == batch_order(1000, 8, 3, 1, lengths=lengths)           # a resumed run sees the same batches
    assert grouped != batch_order(1000, 8, 3, 2, lengths=lengths)           # each epoch its own order
    # two ranks of 8: each batch i of both ranks together is the batch i of one process of 16
    one = batch_order(1000, 16, 3, 1, lengths=lengths)
    ranks = [batch_order(1000, 8, 3, 1, rank=r, world=2, lengths=lengths) for r in (0, 1)]
    assert all(sorted(a + b) == sorted(c) for a, b, c in zip(*ranks, one))


def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM
    r = run_cli("train.py", *common_args(tiny_gpt2, tmp_path / "out", "--epochs", 1, "--pack", "--max-length", 32))
    assert r.returncode == 0, r.stderr
    ours, ref = GPT2.from_pretrained(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not torch.equal(ours.transformer.h[0].attn.c_attn.weight, GPT2.from_pretrained(tiny_gpt2).transformer.h[0].attn.c_attn.weight)
    ids = torch.tensor([load_tokenizer(tmp_path / "out").encode("My grandmother's recipe book has a page")])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4


def test_sigterm_saves_a_resumable_state(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, common_args(tiny_gpt2, out, "--epochs", 50, "--batch-size", 2))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:   # training has started
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "--resume" in stdout
    progress = torch.load(out / "checkpoint/training_state.pt", weights_only=True)["progress"]
    assert progress["step"] > 0 and progress["epoch"] < 50


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the good old model")
    def crash(tmp):
        open(tmp, "wb").write(b"half a mod")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"the good old model" and os.listdir(tmp_path) == ["model.safetensors"]


def test_main_command_resolves_gpt2_through_the_local_hub_cache(tmp_path, hub_gpt2):
    r = run_cli("train.py", "--data", "data/anecdotes_jokes.txt", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "model: gpt2 (lm)" in r.stdout and "epoch 3: validation loss" in r.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= set(os.listdir(tmp_path / "out"))


# ---- bad input: one line, exit status 2, nothing damaged ----------------------------------------

def assert_user_error(result, pattern):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_input_exits_2_with_one_line(tmp_path, tiny_gpt2):
    assert_user_error(run_cli("train.py", "--model", tiny_gpt2, "--data", tmp_path / "missing.txt", "--out", tmp_path / "o"), "not found")
    assert_user_error(run_cli("train.py", "--model", tmp_path / "nothing-here", "--data", "anecdotes_jokes.txt", "--out", tmp_path / "o"), "no folder")


@pytest.mark.parametrize("content, args, pattern", [
    (b"", [], "is empty"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", [], "looks binary"),
    (b"first line\nsecond caf\xe9 line\n", [], "not UTF-8 text: line 2"),
    (b"review,stars\ngood,5\n", ["--task", "classify"], "does not fit"),
    (b"a line\n" * 20, ["--max-length", "4096"], "more than the model's 64 positions"),
    (b"a line\n" * 20, ["--freeze", "99"], "--freeze '99'"),
])
def test_bad_input_messages(tmp_path, tiny_gpt2, content, args, pattern):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    with pytest.raises(NanotuneError, match=pattern):
        train.main(train.parse_args(["--model", str(tiny_gpt2), "--data", str(data), "--out", str(tmp_path / "o"), *args]))
    assert not (tmp_path / "o").exists()


def test_bad_classification_data(tmp_path, tiny_bert):
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("review,stars\ngreat,5\nawful,1\n")
    with pytest.raises(NanotuneError, match="has no 'text'.*'review', 'stars'.*--text-column"):
        train.main(train.parse_args(["--model", str(tiny_bert), "--data", str(wrong), "--out", str(tmp_path / "o")]))
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(NanotuneError, match="never seen in training: neutral"):
        train.main(train.parse_args(["--model", str(tiny_bert), "--data", "sentiment_train.csv", "--val-data", str(val), "--out", str(tmp_path / "o")]))


def test_existing_output_is_never_overwritten(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    assert run_cli("train.py", *common_args(tiny_gpt2, out, "--epochs", 1)).returncode == 0
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert_user_error(run_cli("train.py", *common_args(tiny_gpt2, out)), "already has files.*--resume.*--overwrite")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(run_cli("train.py", "--model", tiny_gpt2, "--data", empty, "--out", out, "--resume"), "is empty")
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == digest


def test_diverging_loss_stops_the_run_before_saving(tmp_path, tiny_gpt2):
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--lr", "1e30", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr       # stderr also holds the progress bar so far
    assert re.search(r"^error: the loss became (nan|inf) at step \d+.*Lower --lr", r.stderr.strip().splitlines()[-1])
    assert not (tmp_path / "o" / "model.safetensors").exists()


