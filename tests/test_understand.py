"""Understanding a model: perplexity over long texts, a classifier's per-label scores, integrated
gradients, each sampling step explained, and what quantization costs each layer."""
import json

import pytest
import torch
from conftest import make_bert, make_gpt2, run_cli

from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.data import lm_windows
from nanotune.evaluate import classification_report, lm_perplexity, top_losses
from nanotune.tools.explain import explain_step, integrated_gradients, label_evidence
from nanotune.tools.quantization_error import layer_errors
from nanotune.generation import generate, top_k_filter, top_p_filter
from nanotune.losses import causal_lm_loss
from nanotune.quantize import QuantConfig, dequantized_weight


# ---- evaluation ------------------------------------------------------------------------------

def test_strided_perplexity_equals_a_hand_computed_one(tiny_gpt2):
    """A 150-token text, a context of 64, windows 32 apart: the windows start at 0, 32, 64 and 96
    and score tokens 1-63, 64-95, 96-127 and 128-149; each token's -log p is taken from its window."""
    model = GPT2.from_pretrained(tiny_gpt2)
    ids = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    nll = []
    with torch.no_grad():
        for begin, first, last in [(0, 1, 63), (32, 64, 95), (64, 96, 127), (96, 128, 149)]:
            log_probs = model(torch.tensor([ids[begin:begin + 64]]))[0].log_softmax(-1)
            nll += [-float(log_probs[t - 1 - begin, ids[t]]) for t in range(first, last + 1)]
    result = lm_perplexity(model, [ids], stride=32)
    assert result["tokens_scored"] == 149 == len(nll) and result["windows"] == 4
    assert abs(result["loss"] - sum(nll) / len(nll)) < 1e-5
    assert abs(result["perplexity"] - torch.tensor(sum(nll) / len(nll)).exp().item()) < 1e-3


def test_a_text_that_fits_scores_as_the_plain_loss(tiny_gpt2):
    model = GPT2.from_pretrained(tiny_gpt2)
    ids = list(range(3, 43))
    with torch.no_grad():
        plain = causal_lm_loss(model(torch.tensor([ids])), torch.tensor([ids])).item()
    for stride in (8, 63, None):
        assert abs(lm_perplexity(model, [ids], stride=stride)["loss"] - plain) < 1e-6


@pytest.mark.parametrize("length, stride", [(10, 5), (64, 63), (65, 63), (200, 1), (200, 63), (129, 50)])
def test_windows_score_every_token_but_the_first_once(length, stride):
    ids = list(range(length))
    scored = [t for window, labels in lm_windows(ids, 64, stride) for t in labels[1:] if t != -100]
    assert sorted(scored) == ids[1:]
    assert all(len(w) <= 64 for w, _ in lm_windows(ids, 64, stride))


def test_classification_report_on_a_hand_built_set():
    names = ["cat", "dog", "fox"]
    labels = [0, 0, 0, 1, 1, 2]
    predictions = [0, 0, 1, 1, 2, 2]
    r = classification_report(predictions, labels, names)
    assert r["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert r["accuracy"] == 4 / 6
    assert r["per_label"]["cat"] == {"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3}
    assert r["per_label"]["dog"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert r["per_label"]["fox"]["precision"] == 0.5 and r["per_label"]["fox"]["recall"] == 1.0
    assert abs(r["macro_f1"] - (0.8 + 0.5 + 2 / 3) / 3) < 1e-12
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.1, 0.3, 0.6], [0.0, 0.1, 0.9]])
    worst = top_losses(probs, labels, list("abcdef"), names, 5)
    assert [w["text"] for w in worst] == ["c", "e"] and worst[0]["p_true"] == pytest.approx(0.2)   # losses 1.61, 1.20


# ---- integrated gradients --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lively_bert(tmp_path_factory, minilm_dir):
    """A tiny BERT with weights large enough to give clearly different logits."""
    return make_bert(tmp_path_factory.mktemp("lively"), minilm_dir, seed=4, initializer_range=0.2)


@pytest.mark.parametrize("baseline", ["pad", "zero"])
def test_integrated_gradients_are_complete_and_flip_with_the_label(lively_bert, baseline):
    model, tok = BertClassifier.from_pretrained(lively_bert), load_tokenizer(lively_bert)
    ids, mask = tok(["The soup was cold and the waiter was rude to us."])
    specials = {tok.bos_id, tok.eos_id}
    results = [integrated_gradients(model, ids, mask, label, steps=32, baseline=baseline, pad_id=tok.pad_id, keep_ids=specials)
               for label in (0, 1)]
    for attributions, at_input, at_baseline in results:
        difference = at_input - at_baseline
        assert abs(difference) > 0.05                                          # something to explain
        assert abs(float(attributions.sum()) - difference) <= 0.01 * abs(difference)   # completeness within 1 %
        assert attributions[0] == 0 and attributions[-1] == 0                  # [CLS] and [SEP] are in the baseline too
    torch.testing.assert_close(results[0][0], -results[1][0], rtol=1e-4, atol=1e-6)    # two labels: one's evidence is the other's negative
    with torch.no_grad():
        logits = model(ids, mask)
    assert abs(float(label_evidence(logits, 1)[0]) - results[1][1]) < 1e-5


def test_explain_on_a_classifier_prints_the_check(lively_bert, tmp_path):
    BertClassifier.from_pretrained(lively_bert, labels=["negative", "positive"]).save_pretrained(tmp_path)
    load_tokenizer(lively_bert).save(tmp_path)
    r = run_cli("generate.py", "--model", tmp_path, "--explain", "--prompt", "Lovely staff and a warm room.", "--show-attention")
    assert r.returncode == 0, r.stderr
    assert "completeness: the attributions add up to" in r.stdout and "lovely(" in r.stdout and "head 3:" in r.stdout
    gap = float(r.stdout.split("a gap of ")[1].split("%")[0])
    assert gap < 1.0
    j = run_cli("generate.py", "--model", tmp_path, "--explain", "--prompt", "Cold soup.", "--json")
    result = json.loads(j.stdout)[0]
    assert result["tokens"][1:3] == ["cold", "soup"] and len(result["attributions"]) == len(result["tokens"])


# ---- sampling, step by step ------------------------------------------------------------------

def test_each_stage_is_what_the_filters_give():
    logits = torch.randn(300, generator=torch.Generator().manual_seed(0)) * 3
    seen = torch.zeros(300, dtype=torch.bool)
    seen[[5, 17]] = True
    step = explain_step(logits, seen, 7, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3, decode=str, top=300)
    penalised = torch.where(seen, torch.where(logits > 0, logits / 1.3, logits * 1.3), logits)
    expected = [penalised, penalised / 0.7, top_k_filter(penalised / 0.7, 20), top_p_filter(top_k_filter(penalised / 0.7, 20), 0.8)]
    assert [s["stage"] for s in step["stages"]] == ["the model", "repetition penalty 1.3", "temperature 0.7", "top-k 20", "top-p 0.8"]
    for stage, logits_after in zip(step["stages"][1:], expected):
        probs = logits_after.softmax(-1)
        shown = dict(stage["top"])
        assert len(shown) == int((probs > 0).sum())
        for token, p in shown.items():
            assert abs(p - float(probs[int(token)])) < 1e-6
    assert step["stages"][3]["removed"] == 280
    assert step["probability"] == pytest.approx(float(expected[-1].softmax(-1)[7]))


def test_greedy_explain_picks_the_tokens_greedy_generation_picks(tiny_gpt2):
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    greedy = tok.decode(generate(model, [tok.encode("My dog")], 12, tok.pad_id, tok.eos_id, temperature=0)[0])
    r = run_cli("generate.py", "--model", tiny_gpt2, "--prompt", "My dog", "--prompt", "Why", "--explain", "--temperature", 0,
                "--max-new-tokens", 12, "--json")
    assert r.returncode == 0, r.stderr
    explained = json.loads(r.stdout)
    assert explained[0]["text"] == greedy and len(explained) == 2
    steps = explained[0]["steps"]
    assert all(s["chosen"] == s["stages"][0]["top"][0][0] for s in steps)          # greedy: always the model's first choice
    assert "".join(s["chosen"] for s in steps[:len(steps)]).startswith(greedy[:5])


# ---- quantization fidelity -------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_64(tmp_path_factory, bpe_dir):
    return make_gpt2(tmp_path_factory.mktemp("gpt2-64"), bpe_dir, seed=5, n_embd=64, n_head=4, n_layer=2)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_each_layers_error_is_what_it_should_be(gpt2_64, mode):
    """One layer's errors, computed here from the full-precision model and the quantized layer."""
    full, quantized = GPT2.from_pretrained(gpt2_64), GPT2.from_pretrained(gpt2_64, quantize=QuantConfig(mode))
    ids = torch.tensor([load_tokenizer(gpt2_64).encode("The weather forecast said thirty percent, so I took a boat.")])
    rows = {r["layer"]: r for r in layer_errors(quantized, gpt2_64, {"input_ids": ids, "attention_mask": None})}
    assert len(rows) == 2 * 4
    name = "transformer.h.1.mlp.c_fc"
    exact, layer = full.get_submodule(name), quantized.get_submodule(name)
    captured = {}
    handle = layer.register_forward_hook(lambda m, args, out: captured.update(x=args[0][0]))
    with torch.no_grad():
        quantized(ids)
        handle.remove()
        x = captured["x"]
        weight_error = (dequantized_weight(layer) - exact.weight).norm() / exact.weight.norm()
        output_error = (layer(x) - exact(x)).norm() / exact(x).norm()
    assert rows[name]["weight_error"] == pytest.approx(float(weight_error), rel=1e-4)
    assert rows[name]["output_error"] == pytest.approx(float(output_error), rel=1e-3)
    assert 0 < rows[name]["weight_error"] < (0.02 if mode == "8bit" else 0.2)


def test_compare_and_the_training_report(tmp_path, gpt2_64):
    r = run_cli("generate.py", "--model", gpt2_64, "--quantize", "4bit", "--eval", "anecdotes_jokes.txt", "--compare", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert set(result["formats"]) == {"nf4 double-quant", "nf4", "fp4 double-quant", "fp4"}
    assert result["full_precision"]["tokens_scored"] == result["quantized"]["tokens_scored"]
    assert result["layers"][0]["output_error"] >= result["layers"][-1]["output_error"]   # worst first
    out = tmp_path / "out"
    t = run_cli("train.py", "--model", gpt2_64, "--data", "anecdotes_jokes.txt", "--quantize", "4bit", "--epochs", 1,
                "--lr", 1e-3, "--merge", "--out", out)
    assert t.returncode == 0, t.stderr
    assert "quantization (4bit nf4): 8 quantized layers" in t.stdout and "merging moved the logits by up to" in t.stdout
    saved = json.loads((out / "quantization.json").read_text())
    assert len(saved["layers"]) == 8 and saved["merge"]["max_logit_difference"] >= 0
    assert {"loss", "perplexity"} <= set(saved["merge"]["merged"])


def test_eval_on_a_classifier_with_a_plot(tmp_path, tiny_bert):
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(tmp_path / "m")
    load_tokenizer(tiny_bert).save(tmp_path / "m")
    r = run_cli("generate.py", "--model", tmp_path / "m", "--eval", "sentiment_val.csv", "--plot", tmp_path / "cm.png", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sum(map(sum, result["confusion"])) == 48 and set(result["per_label"]) == {"negative", "positive"}
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nfine,neutral\n")
    wrong = run_cli("generate.py", "--model", tmp_path / "m", "--eval", bad)
    assert wrong.returncode == 2 and "labels the model does not know (neutral)" in wrong.stderr
