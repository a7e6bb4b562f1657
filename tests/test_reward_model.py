"""A reward model (train.py --reward-model): its loss is TRL's RewardTrainer loss on the same numbers,
its scores are transformers' LlamaForSequenceClassification's, train.py trains one through its own
loop to a held-out accuracy of 0.9 on pairs whose chosen answer holds a given word, and the saved run
reloads: generate.py --eval reports its accuracy and --serve serves its scores on /v1/score."""
import json
import signal
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from test_dpo import metrics, pairs_of, word_pairs, write_rows
from test_serve import request, start_server

import train
from nanotune import NanotuneError, load_tokenizer
from nanotune.data import make_batch
from nanotune.llama import Llama
from nanotune.preference import add_score_head, reward_loss, scores, task_of
from nanotune.run.train_flags import parser


def trl_reward_loss(chosen, rejected, margin=None):
    """TRL's RewardTrainer.compute_loss itself, on a model whose scores are the given numbers."""
    from trl import RewardTrainer
    both = torch.cat([chosen, rejected])
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                              _metrics={"eval": defaultdict(list)}, _total_train_tokens=0,
                              accelerator=SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x))
    inputs = {"input_ids": torch.zeros(len(both), 1, dtype=torch.long)} | ({"margin": margin} if margin is not None
                                                                            else {})
    model = lambda **kw: SimpleNamespace(logits=both[:, None])
    return float(RewardTrainer.compute_loss(trainer, model, inputs)), trainer._metrics["eval"]


@pytest.mark.parametrize("margin", [None, torch.tensor([0.0, 1.0, 2.5])], ids=["no-margin", "margin"])
def test_the_reward_loss_is_trls_reward_trainer_loss(margin):
    chosen, rejected = torch.tensor([1.5, -0.5, 3.0]), torch.tensor([0.5, 0.25, -1.0])
    expected, trl_metrics = trl_reward_loss(chosen, rejected, margin)
    assert float(reward_loss(chosen, rejected, margin).mean()) == pytest.approx(expected, abs=1e-6)
    assert trl_metrics["accuracy"] == [pytest.approx(2 / 3)]


def test_the_scores_and_the_loss_are_transformers_and_trls_on_a_tiny_llama(tiny_llama):
    from transformers import LlamaForSequenceClassification
    tokenizer = load_tokenizer(tiny_llama)
    pairs = pairs_of(tokenizer)
    for p, margin in zip(pairs, (0.0, 0.5, 1.0)):
        p.margin = margin
    model = add_score_head(Llama.from_pretrained(tiny_llama))
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    with torch.no_grad():
        ours = scores(model, batch)
        summed = train.loss_sum(model, batch, "reward")
    # transformers' reward model: the same body, a `score` head read at the last token that is not padding
    pad = model.config.vocab_size - 1
    assert pad not in batch["input_ids"][batch["attention_mask"].bool()]
    hf = LlamaForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, pad_token_id=pad).eval()
    hf.score.weight.data.copy_(model.score.weight)
    input_ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, pad)
    inputs = {"input_ids": input_ids, "attention_mask": batch["attention_mask"], "margin": batch["margin"]}
    with torch.no_grad():
        theirs = hf(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits.squeeze(-1)
        expected, _ = trl_reward_loss(*theirs.chunk(2), inputs["margin"])
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    assert float(summed) / 3 == pytest.approx(expected, abs=1e-5)
    assert float(batch["metrics"]["accuracy"]) == float((ours[:3] > ours[3:]).sum())


@pytest.mark.parametrize("lora", [[], ["--lora-r", 8]], ids=["full", "lora"])
def test_train_py_trains_a_reward_model_that_reloads_and_ranks_held_out_pairs(tmp_path, tiny_llama, lora):
    train_file, val_file = word_pairs(tmp_path / "train.jsonl", 0, 48), word_pairs(tmp_path / "val.jsonl", 48, 20)
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_llama, "--data", train_file, "--val-data", val_file, "--epochs", 3,
                "--lr", 1e-3 if not lora else 1e-2, "--reward-model", "--out", out, *lora)
    assert r.returncode == 0, r.stderr
    assert "(reward)" in r.stdout and "reward model: a score head" in r.stdout
    final = [m for m in metrics(out) if m["event"] == "eval"][-1]
    assert final["accuracy"] >= 0.9, final
    assert (out / "score.safetensors").is_file()
    r = run_cli("generate.py", "--model", out, "--eval", val_file, "--json")
    assert r.returncode == 0, r.stderr
    scores_ = json.loads(r.stdout)
    assert scores_["pairs"] == 20 and scores_["accuracy"] == pytest.approx(final["accuracy"]), (scores_, final)


def test_a_reward_model_is_served_on_v1_score(tmp_path, tiny_llama):
    train_file = word_pairs(tmp_path / "train.jsonl", 0, 48)
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_llama, "--data", train_file, "--val-split", 0, "--epochs", 3, "--lr", 1e-3,
                "--reward-model", "--out", out)
    assert r.returncode == 0, r.stderr
    proc, port = start_server(out)
    try:
        rows = json.loads(train_file.read_text().splitlines()[0])
        body = {"input": [{"prompt": rows["prompt"], "answer": rows["chosen"]},
                          {"prompt": rows["prompt"], "answer": rows["rejected"]}]}
        status, answer = request(port, "POST", "/v1/score", body)
        assert status == 200, answer
        chosen, rejected = (d["score"] for d in answer["data"])
        assert chosen > rejected
        status, answer = request(port, "POST", "/v1/score", {"input": [{"prompt": "Hi", "answer": ""}]})
        assert status == 400 and answer["error"]["message"].startswith("input item 0 has no 'answer'"), answer
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def test_a_language_model_has_no_v1_score(tiny_gpt2):
    proc, port = start_server(tiny_gpt2)
    try:
        status, answer = request(port, "POST", "/v1/score", {"input": {"prompt": "Hi", "answer": " there"}})
        assert status == 400 and "not a reward model" in answer["error"]["message"], answer
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


@pytest.mark.parametrize("flags, data, message", [
    (["--beta", "0.5"], "joke_pairs.jsonl", "--beta is DPO's"),
    (["--dpo-loss", "ipo"], "joke_pairs.jsonl", "--dpo-loss is DPO's"),
    ([], "joke_chats.jsonl", "--reward-model trains on preference pairs"),
    (["--reward", "r.py:f"], "joke_pairs.jsonl", "give one of them"),
    (["--lora-r", "8", "--merge"], "joke_pairs.jsonl", "leave --merge out")])
def test_flags_that_do_not_fit_a_reward_model_are_refused(flags, data, message):
    from conftest import ROOT
    args = parser().parse_args(["--data", str(ROOT / "data" / data), "--reward-model", *flags])
    with pytest.raises(NanotuneError, match=message):
        task_of(args, "lm")


def test_a_bad_pair_stops_a_reward_model_with_its_line(tmp_path, tiny_llama):
    data = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": " Same.", "rejected": " Same."}])
    r = run_cli("train.py", "--model", tiny_llama, "--data", data, "--reward-model", "--out", tmp_path / "out")
    assert r.returncode == 2 and "line 1: the chosen and the rejected answer are the same" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
