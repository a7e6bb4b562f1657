"""Adapting a model to the data: new tokens (in transformers and peft too), the data report, long
texts (head + tail truncation, overlapping windows) and a hyper-parameter search that resumes."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cli

from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.data import lm_batch, lm_sequences, truncate
from nanotune.tools.data_report import data_report
from nanotune.losses import next_token_labels
from nanotune.new_tokens import add_tokens, resize_token_embeddings

NEW = ["<|user|>", "<|bot|>"]


def test_new_tokens_are_single_ids_and_old_logits_do_not_move(tiny_gpt2):
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    ids = torch.tensor([tok.encode("My grandmother keeps a spare key.")])
    with torch.no_grad():
        before = model(ids)
    old_rows, old_mean = model.config.vocab_size, model.transformer.wte.weight.mean(0)
    new = add_tokens(tok, NEW)
    assert new == [old_rows, old_rows + 1]
    assert tok.encode("<|user|>") == [new[0]] and new[0] in tok.encode("Hi <|user|> hello") and new[1] in tok.encode("hello<|bot|>!")
    assert resize_token_embeddings(model, tok.vocab_size, multiple_of=8) == 520          # 514 rounded up to a multiple of 8
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape[0] == 520
    torch.testing.assert_close(model.transformer.wte.weight[old_rows:], old_mean.expand(520 - old_rows, -1))
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after[..., :old_rows], before, rtol=0, atol=1e-6)


def test_trained_with_new_tokens_loads_in_transformers(tmp_path, tiny_gpt2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-3,
                "--add-tokens", ",".join(NEW), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "tokens: added 2 of 2" in r.stdout
    ref_tok, ours_tok = AutoTokenizer.from_pretrained(out), load_tokenizer(out)
    text = "<|user|> Why did the chicken cross the road? <|bot|>"
    assert ref_tok(text)["input_ids"] == ours_tok.encode(text) and ours_tok.encode(text)[0] == ours_tok.vocab_size - 2
    ids = torch.tensor([ours_tok.encode(text)])
    ref, ours = AutoModelForCausalLM.from_pretrained(out).eval(), GPT2.from_pretrained(out)
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_lora_with_new_tokens_trains_their_rows_and_loads_in_peft(tmp_path, tiny_gpt2):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", 1e-2, "--lora-r", 4,
                "--add-tokens", ",".join(NEW), "--out", out)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    rows = config["trainable_token_indices"]["wte"]
    from safetensors.torch import load_file
    saved = load_file(out / "adapter_model.safetensors")
    assert saved["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"].shape[0] == len(rows) == 2
    base = GPT2.from_pretrained(tiny_gpt2)
    from nanotune.lora import load_adapter
    ours = load_adapter(GPT2.from_pretrained(tiny_gpt2), out).eval()
    assert torch.equal(ours.transformer.wte.weight[:base.config.vocab_size], base.transformer.wte.weight)   # old rows untouched
    assert not torch.allclose(ours.transformer.wte.weight[rows], base.transformer.wte.weight.mean(0).expand(2, -1))  # new rows trained
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2)
    hf.resize_token_embeddings(ours.config.vocab_size)
    ref = PeftModel.from_pretrained(hf, out).eval()
    ids = torch.tensor([load_tokenizer(out).encode("<|user|> Why? <|bot|> Because.")])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4
    gen = run_cli("generate.py", "--model", out, "--prompt", "<|user|> Why", "--max-new-tokens", 3, "--temperature", 0)
    assert gen.returncode == 0 and gen.stdout.startswith("<|user|> Why"), gen.stderr


def test_new_tokens_in_a_classifier_load_in_transformers(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_bert, "--data", "sentiment_train.csv", "--val-data", "sentiment_val.csv", "--epochs", 1,
                "--add-tokens", "<ORDER>,<REVIEW>", "--pad-vocab-to-multiple-of", 64, "--out", out)
    assert r.returncode == 0, r.stderr
    text = "<REVIEW> lovely staff <ORDER>"
    ours_tok, ref_tok = load_tokenizer(out), AutoTokenizer.from_pretrained(out)
    assert ours_tok.encode(text) == ref_tok(text)["input_ids"] and ours_tok.encode(text)[1] == 30523    # <ORDER> 30522, <REVIEW> 30523
    ref, ours = AutoModelForSequenceClassification.from_pretrained(out).eval(), BertClassifier.from_pretrained(out)
    assert ours.config.vocab_size == 30528                                     # 30,524 rounded up to 64s
    ids, mask = ours_tok([text, "cold soup"])
    with torch.no_grad():
        assert (ref(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() <= 1e-4


def test_the_data_report_counts_a_hand_made_file(minilm_dir):
    tok = load_tokenizer(minilm_dir)
    examples = [{"text": "the unfriendliness of overcooked cafés", "label": "negative"},
                {"text": "unfriendliness again ☃", "label": "negative"}, {"text": "fine", "label": "negative"},
                {"text": "good", "label": "negative"}, {"text": "great", "label": "positive"}]
    r = data_report(examples, tok, "classify", max_length=6)
    pieces = {w: len(tok.encode(w, add_special_tokens=False)) for w in ("unfriendliness", "overcooked", "cafés", "the")}
    split = {w for w, n in pieces.items() if n >= 3}
    assert dict(r["split_words"]["most_frequent"]) == {w: 2 if w == "unfriendliness" else 1 for w in split}
    assert r["unencodable_characters"] == {"☃": {"count": 1, "as": "[UNK]"}}
    lengths = sorted(len(tok.encode(e["text"])) for e in examples)
    assert r["lengths"]["max"] == lengths[-1] and r["lengths"]["longer"] == sum(n > 6 for n in lengths)
    assert r["labels"] == {"counts": {"negative": 4, "positive": 1}, "imbalance": 4.0}
    shown = run_cli("train.py", "--model", minilm_dir, "--data", "sentiment_train.csv", "--data-report", "--out", "/nonexistent/x")
    assert shown.returncode == 0 and "data report:" in shown.stdout and "labels: " in shown.stdout


def test_head_tail_truncation_keeps_exactly_the_right_tokens():
    cls, sep, body = 101, 102, list(range(1000, 1600))
    ids = [cls, *body, sep]
    assert truncate(ids, 512, "head") == [cls, *body[:510], sep]
    assert truncate(ids, 512, "tail") == [cls, *body[-510:], sep]
    assert truncate(ids, 512, "head+tail") == [cls, *body[:128], *body[-382:], sep]         # the paper's 128 + 382
    assert truncate(ids, 10, "head+tail") == [cls, *body[:2], *body[-6:], sep]
    assert truncate(ids[:20], 512, "head+tail") == ids[:20]


@pytest.mark.parametrize("length, stride", [(150, 16), (150, 63), (64, 32), (30, 8)])
def test_overlapping_training_windows_score_every_token_once(length, stride):
    ids = list(range(10, 10 + length))
    sequences, contexts, too_long = lm_sequences([ids], 64, eos_id=9, stride=stride)
    batch = lm_batch(sequences, 0, contexts)
    targets = next_token_labels(batch["labels"])
    scored = targets[targets != -100].tolist()
    assert sorted(scored) == sorted((ids + [9])[1:])          # each token but the first once: its window saw the ones before
    assert too_long == (length + 1 > 64)


def test_a_grid_search_ranks_keeps_the_best_and_resumes(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    args = [sys.executable, str(ROOT / "train.py"), "--model", str(tiny_gpt2), "--data", "anecdotes_jokes.txt", "--epochs", "2",
            "--search", "lr=1e-4,3e-3", "--search", "batch-size=4,8", "--out", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:                             # stop the search during its third trial
        results = out / "search.json"
        if results.is_file() and sum(t["status"] == "done" for t in json.loads(results.read_text())["trials"]) == 2 \
                and (out / "search" / "trial-003" / "metrics.jsonl").is_file():
            break
        time.sleep(0.2)
    import os
    os.killpg(proc.pid, signal.SIGINT)                        # Ctrl-C reaches the search and its trial, as in a terminal
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "continue it with the same command plus --resume" in stdout
    finished = {name: (out / "search" / name / "metrics.jsonl").read_text() for name in ("trial-001", "trial-002")}
    resumed = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("done before") == 2 and "trial-003 of 4" in resumed.stdout
    assert {name: (out / "search" / name / "metrics.jsonl").read_text() for name in finished} == finished   # not redone
    trials = json.loads((out / "search.json").read_text())["trials"]
    assert [t["status"] for t in trials] == ["done"] * 4 and {t["seed"] for t in trials} == {42}
    best = min(trials, key=lambda t: t["loss"])
    table = resumed.stdout[resumed.stdout.index("trial      lr"):].splitlines()[1:5]
    assert [row.split()[0] for row in table] == [t["name"] for t in sorted(trials, key=lambda t: t["loss"])]   # ranked
    from safetensors.torch import load_file
    assert load_file(out / "model.safetensors").keys() == load_file(out / "search" / best["name"] / "model.safetensors").keys()
    assert (out / "model.safetensors").read_bytes() == (out / "search" / best["name"] / "model.safetensors").read_bytes()
    assert (out / "search.png").read_bytes()[:4] == b"\x89PNG"
