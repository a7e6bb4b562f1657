"""Preference tuning (DPO): the loss equals the published formulas, the log-probabilities equal
transformers', the first step is ln 2 with every reward 0, the reference under LoRA is the base
model, pairs render as transformers renders them, bad rows stop with their line, and train.py
trains on pairs through its own loop."""
import copy
import math

import pytest
import torch

import train
from nanotune import load_tokenizer
from nanotune.data import make_batch
from nanotune.llama import Llama
from nanotune.lora import LoRAConfig, add_lora, adapters_off
from nanotune.preference import (Pair, answer_logps, dpo_loss, loss_sum, render_pairs, reward_loss, sequence_logps,
                                 tokenize_pairs, without_dropout)

CHOSEN, REJECTED = [-12.5, -30.0, -7.25], [-14.0, -29.0, -9.5]
REF_CHOSEN, REF_REJECTED = [-13.0, -29.5, -8.0], [-13.5, -29.75, -9.0]


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("kind, beta, smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.1, 0.2),
                                                   ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0)])
def test_dpo_loss_is_the_published_formula(kind, beta, smoothing):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)
    losses, chosen, rejected = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta, smoothing, kind)
    for i in range(3):
        h = (CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i])
        if kind == "sigmoid":        # DPO eq. 7; conservative DPO: the labels flipped with probability e
            expected = -(1 - smoothing) * log_sigmoid(beta * h) - smoothing * log_sigmoid(-beta * h)
        else:                        # IPO eq. 17
            expected = (h - 1 / (2 * beta)) ** 2
        assert float(losses[i]) == pytest.approx(expected, abs=1e-6)
        assert float(chosen[i]) == pytest.approx(beta * (CHOSEN[i] - REF_CHOSEN[i]), abs=1e-6)
        assert float(rejected[i]) == pytest.approx(beta * (REJECTED[i] - REF_REJECTED[i]), abs=1e-6)


def test_the_reward_model_loss_is_bradley_terry_with_a_margin():
    chosen, rejected, margin = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 0.25]), torch.tensor([0.0, 1.0])
    expected = [-log_sigmoid(1.0), -log_sigmoid(-0.75 - 1.0)]
    assert reward_loss(chosen, rejected, margin).tolist() == pytest.approx(expected, abs=1e-6)


PAIRS = [("The cat sat on the", " mat, and purred.", " moon, and barked."),
         ("My doctor said", " I should laugh more.", " nothing at all, twice."),
         ("A joke:", " why did the chicken cross the road?", " no.")]


def pairs_of(tokenizer, rows=PAIRS, max_length=64):
    examples = [{"prompt": p, "chosen": c, "rejected": r, "margin": 0.0, "chat": False, "where": f"line {i}"}
                for i, (p, c, r) in enumerate(rows, start=1)]
    render_pairs(examples, [], tokenizer, "tiny")
    return tokenize_pairs(examples, tokenizer, max_length)[0]


def test_sequence_logps_equal_transformers_log_probabilities_of_the_answers(tiny_llama):
    from transformers import LlamaForCausalLM
    tokenizer = load_tokenizer(tiny_llama)
    pairs = pairs_of(tokenizer)
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    with torch.no_grad():
        ours = answer_logps(Llama.from_pretrained(tiny_llama), batch)[0]
    hf = LlamaForCausalLM.from_pretrained(tiny_llama).eval()
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    for k, (prompt, answer) in enumerate(rows):          # one unpadded row at a time, token by token
        with torch.no_grad():
            logps = hf(torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
        expected = sum(float(logps[len(prompt) + j - 1, token]) for j, token in enumerate(answer))
        assert float(ours[k]) == pytest.approx(expected, abs=1e-4)


def test_sequence_logps_score_only_the_masked_positions():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 0], [4, 4, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    logps = logits.log_softmax(-1)
    expected = [float(logps[0, 1, 2] + logps[0, 2, 3]), float(logps[1, 0, 4])]
    assert sequence_logps(logits, labels, mask).tolist() == pytest.approx(expected, abs=1e-6)


def one_step(model, batch, lr=1e-3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    summed, count, _ = train.train_step(model, [batch], optimizer, lr, "dpo", 1.0, torch.device("cpu"), beta=0.1)
    return float(summed) / count


@pytest.mark.parametrize("lora", [False, True])
def test_the_first_step_is_ln_2_with_every_reward_0(tiny_llama, lora):
    tokenizer = load_tokenizer(tiny_llama)
    model, pairs = Llama.from_pretrained(tiny_llama).train(), pairs_of(tokenizer)
    if lora:                 # the reference: the same model with its adapters off, at each step
        add_lora(model, LoRAConfig(("q_proj", "v_proj"), r=4, dropout=0.1))
    without_dropout(model)
    if not lora:             # the reference: computed once, before training, with the initial weights
        from nanotune.preference import add_reference
        add_reference(model, pairs, 2, tokenizer.pad_id, "cpu")
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    assert ("ref_logps" in batch) != lora
    assert one_step(model, batch) == pytest.approx(math.log(2), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(float(batch["metrics"][name])) < 1e-6, name
    second = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    assert one_step(model, second) != pytest.approx(math.log(2), abs=1e-5)       # the step moved the model


def test_the_reference_under_lora_is_exactly_the_base_model(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    pairs = pairs_of(tokenizer)
    base = Llama.from_pretrained(tiny_llama)
    model = add_lora(copy.deepcopy(base), LoRAConfig(("q_proj", "v_proj", "down_proj"), r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)                # a trained adapter: the model is no longer the base
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    with torch.no_grad():
        expected, tuned = answer_logps(base, batch)[0], answer_logps(model, batch)[0]
        with adapters_off(model):
            assert torch.equal(answer_logps(model, batch)[0], expected)
        assert not torch.allclose(tuned, expected)
        loss_sum(model, batch, beta=0.1)
    chosen_rewards = 0.1 * (tuned[:3] - expected[:3])
    assert float(batch["metrics"]["rewards/chosen"]) == pytest.approx(float(chosen_rewards.sum()), abs=1e-5)
