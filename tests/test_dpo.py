"""Preference tuning (DPO): the loss equals the published formulas, the log-probabilities equal
transformers', the first step is ln 2 with every reward 0, the reference under LoRA is the base
model, pairs render as transformers renders them, bad rows stop with their line, and train.py
trains on pairs through its own loop."""
import copy
import json
import math

import pytest
import torch

from conftest import ROOT, run_cli

import train
from nanotune import load_tokenizer
from nanotune.data import make_batch, read_examples
from nanotune.llama import Llama
from nanotune.lora import LoRAConfig, add_lora, adapters_off
from nanotune.preference import (answer_logps, dpo_loss, loss_sum, render_pairs, reward_loss, sequence_logps,
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


# ---- preference data: rendering and bad rows ------------------------------------------------------

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
          " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_pairs_render_as_transformers_apply_chat_template_then_the_answer(tmp_path, tiny_llama):
    from transformers import PreTrainedTokenizerFast
    rows = [{"prompt": [{"role": "system", "content": "Be funny."}, {"role": "user", "content": "A joke about cats?"}],
             "chosen": [{"role": "assistant", "content": "My cat knocked my coffee off the table."}],
             "rejected": {"role": "assistant", "content": "No."}},            # one message, not a list: TRL allows it
            {"prompt": [{"role": "user", "content": "And dogs?"}], "chosen": "The dog ate my homework.",
             "rejected": [{"role": "assistant", "content": "Dogs are dogs."}]}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.chat_template = CHATML
    examples = read_examples(tmp_path / "pairs.jsonl")
    render_pairs(examples, [], tokenizer, "tiny")
    pairs = tokenize_pairs(examples, tokenizer, 128)[0]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny_llama / "tokenizer.json"))
    hf.chat_template = CHATML
    for row, example, pair in zip(rows, examples, pairs):
        prompt = row["prompt"]
        ids = hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        assert pair.prompt == (ids if isinstance(ids, list) else ids["input_ids"])    # (a dict in transformers 5)
        for k in ("chosen", "rejected"):
            answer = row[k] if isinstance(row[k], list) else [row[k]] if isinstance(row[k], dict) else [
                {"role": "assistant", "content": row[k]}]
            whole = hf.apply_chat_template(prompt + answer, tokenize=False)
            assert example["prompt_text"] + example[k + "_text"] == whole.rstrip()        # up to <|im_end|>
            assert getattr(pair, k) == hf(example[k + "_text"], add_special_tokens=False)["input_ids"]
            assert example[k + "_text"].endswith(answer[-1]["content"] + "<|im_end|>")


def write_rows(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"prompt": "Tell me a joke.", "chosen": " A man walks into a library.", "rejected": " No."}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "Tell me a joke.", "chosen": " A man walks into a library."}, "line 2 has no 'rejected'"),
    ({"prompt": "Hi", "chosen": " Same.", "rejected": " Same."},
     "line 2: the chosen and the rejected answer are the same"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": " No."}, "line 2 has an empty answer"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "No."}]}, "line 2 mixes plain text and conversations"),
    ({"prompt": "word " * 40, "chosen": " Yes.", "rejected": " No."}, "line 2: the prompt is"),
], ids=["missing-field", "chosen-equals-rejected", "empty-answer", "mixed-formats", "no-room-for-the-answer"])
def test_a_bad_preference_row_exits_2_naming_its_line_before_anything_is_written(tmp_path, tiny_llama, bad, message):
    data = write_rows(tmp_path / "pairs.jsonl", [GOOD, bad, GOOD])
    out = tmp_path / "out"
    r = run_cli("train.py", "--model", tiny_llama, "--data", data, "--val-split", 0, "--max-length", 24, "--out", out)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


# ---- train.py on pairs ---------------------------------------------------------------------------

def word_pairs(path, start, n):
    """Pairs whose chosen answer always ends with " cat" and the rejected one with " dog"."""
    lines = [line.split() for line in (ROOT / "data/anecdotes_jokes.txt").read_text().splitlines()]
    lines = [words for words in lines if len(words) > 8]
    rows = [{"prompt": " ".join(w[:4]), "chosen": " " + " ".join(w[4:7]) + " cat",
             "rejected": " " + " ".join(w[4:7]) + " dog"} for w in lines[start:start + n]]
    return write_rows(path, rows)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_py_learns_a_preference_held_out_pairs_show(tmp_path, tiny_llama):
    train_file, val_file = word_pairs(tmp_path / "train.jsonl", 0, 48), word_pairs(tmp_path / "val.jsonl", 48, 20)
    r = run_cli("train.py", "--model", tiny_llama, "--data", train_file, "--val-data", val_file, "--epochs", 1,
                "--lr", 1e-2, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "model: " in r.stdout and "(dpo)" in r.stdout and "reference: the model's log-probabilities" in r.stdout
    records = metrics(tmp_path / "out")
    first = next(m for m in records if m["event"] == "train")
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
    assert all(name in first for name in names)
    final = [m for m in records if m["event"] == "eval"][-1]
    assert final["rewards/accuracies"] >= 0.9 and final["loss"] < math.log(2), final
    assert final["rewards/margins"] == pytest.approx(final["rewards/chosen"] - final["rewards/rejected"], abs=1e-5)


# Sends train.py a SIGTERM (as a scheduler does) right after its n-th optimizer step: the run saves
# where it stopped, in the middle of an epoch.
STOP_AFTER = r"""
import os, runpy, signal, sys
nth = int(sys.argv[1])
sys.argv = sys.argv[2:]
import torch
steps, real_step = 0, torch.optim.AdamW.step
def step(self, *args, **kwargs):
    global steps
    steps += 1
    result = real_step(self, *args, **kwargs)
    if steps == nth:
        os.kill(os.getpid(), signal.SIGTERM)
    return result
torch.optim.AdamW.step = step
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("lora", [[], ["--lora-r", 4]], ids=["reference-computed-once", "reference-adapters-off"])
def test_dpo_resumed_mid_epoch_ends_as_the_uninterrupted_run(tmp_path, tiny_llama, monkeypatch, lora):
    import signal
    import subprocess
    import sys
    monkeypatch.setenv("MKL_CBWR", "AUTO")                   # one path through MKL's products, every process
    data = word_pairs(tmp_path / "pairs.jsonl", 0, 24)
    args = lambda out: list(map(str, ["--model", tiny_llama, "--data", data, "--epochs", 2, "--batch-size", 4,
                                      "--lr", 1e-3, "--out", out, *lora]))
    full = run_cli("train.py", *args(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    stopped = subprocess.run([sys.executable, "-c", STOP_AFTER, "4", str(ROOT / "train.py"), *args(tmp_path / "split")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    progress = torch.load(tmp_path / "split/checkpoint/training_state.pt", weights_only=True)["progress"]
    assert progress["epoch"] == 0 and progress["step_in_epoch"] > 0               # stopped in the middle of an epoch
    resumed = run_cli("train.py", *args(tmp_path / "split"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full/checkpoint/training_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/checkpoint/training_state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same held-out loss and rewards after each epoch (the training means since the last report
    # differ: the resumed run's first report averages fewer steps)
    evals = lambda out: [{k: v for k, v in m.items() if k != "time"} for m in metrics(out) if m["event"] == "eval"]
    assert evals(tmp_path / "split") == evals(tmp_path / "full") and len(evals(tmp_path / "full")) == 2


# ---- the chapter's recipe is train.py's step ---------------------------------------------------------

def test_the_dpo_chapter_steps_as_train_py_does(tiny_llama):
    from test_chapters import chapter, steps_agree
    module, tokenizer = chapter("dpo"), load_tokenizer(tiny_llama)
    model, pairs = Llama.from_pretrained(tiny_llama).train(), pairs_of(tokenizer)
    without_dropout(model)
    module.add_reference(model, pairs, 2, tokenizer.pad_id)
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    for name, p in model.named_parameters():       # a model that is not its reference: rewards and gradients not 0
        if name.endswith("o_proj.weight"):
            p.data.add_(0.05 * torch.randn_like(p))
    chapter_step = lambda m, optimizer, b: module.step(m, optimizer, b, 0.1)[0]
    ours, theirs = steps_agree(model, batch, "dpo", chapter_step, 1.0)
    assert ours == pytest.approx(theirs, abs=1e-6) and ours != pytest.approx(math.log(2), abs=1e-3)


def test_the_dpo_chapter_runs_top_to_bottom(tmp_path, tiny_llama, capsys):
    from test_chapters import chapter
    rows = (ROOT / "data/joke_pairs.jsonl").read_text().splitlines()[:40]
    chapter("dpo").main(["--model", str(tiny_llama), "--chat-template", "chatml", "--lr", "1e-3",
                         "--data", str(write_rows(tmp_path / "pairs.jsonl", rows))])
    assert "step 10: loss" in capsys.readouterr().out


def test_the_dpo_chapters_help_says_what_it_does_in_a_whole_sentence(capsys):
    from test_chapters import chapter
    with pytest.raises(SystemExit):
        chapter("dpo").main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.startswith("Preference tuning") and description.rstrip().endswith("."), description


def test_generate_eval_reports_pairwise_accuracy_against_the_base_model(tmp_path, tiny_llama):
    train_file, val_file = word_pairs(tmp_path / "train.jsonl", 0, 48), word_pairs(tmp_path / "val.jsonl", 48, 20)
    r = run_cli("train.py", "--model", tiny_llama, "--data", train_file, "--val-data", val_file, "--epochs", 2,
                "--lr", 2e-2, "--lora-r", 8, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "reference: the same model with its LoRA adapters off" in r.stdout
    r = run_cli("generate.py", "--model", tmp_path / "out", "--eval", val_file, "--json")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert scores["pairs"] == 20 and scores["reward_accuracy"] >= 0.9 and scores["accuracy"] >= 0.9, scores


@pytest.mark.parametrize("options, expected", [(dict(kind="ipo", beta=0.1), (0 - 1 / (2 * 0.1)) ** 2),
                                               (dict(kind="ipo", beta=0.5), 1.0),
                                               (dict(beta=0.1, label_smoothing=0.2), math.log(2))])
def test_the_variants_first_step_is_their_formula_at_a_margin_of_0(tiny_llama, options, expected):
    tokenizer = load_tokenizer(tiny_llama)
    model, pairs = Llama.from_pretrained(tiny_llama).train(), pairs_of(tokenizer)
    without_dropout(model)
    from nanotune.preference import add_reference
    add_reference(model, pairs, 3, tokenizer.pad_id, "cpu")
    batch = make_batch("dpo", pairs, None, [0, 1, 2], tokenizer.pad_id, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    summed, count, _ = train.train_step(model, [batch], optimizer, 1e-3, "dpo", 1.0, torch.device("cpu"), **options)
    assert float(summed) / count == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("flags, message", [(["--pack"], "--pack does not apply to preference pairs"),
                                            (["--dpo-loss", "ipo", "--label-smoothing", "0.1"], "IPO has no labels"),
                                            (["--train-on", "all"], "--train-on does not apply")])
def test_flags_that_do_not_fit_preference_pairs_are_refused(flags, message):
    from nanotune import NanotuneError
    from nanotune.preference import task_of
    from nanotune.run.train_flags import parser
    args = parser().parse_args(["--data", str(ROOT / "data/joke_pairs.jsonl"), *flags])
    with pytest.raises(NanotuneError, match=message):
        task_of(args, "lm")
    plain = parser().parse_args(["--data", str(ROOT / "data/joke_chats.jsonl"), *flags])
    assert task_of(plain, "lm") == "lm"                      # other data: not preference tuning
