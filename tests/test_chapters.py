"""The chapters' scripts (chapters/) run top to bottom, and each one's training step computes what
train.py's step computes on the same batch: the same loss and the same gradients. So the book's
plain recipe and the tool cannot drift apart."""
import importlib.util

import pytest
import torch
from conftest import DATA, ROOT, run_cli

import train
from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.data import lm_sequences, make_batch, read_examples, truncate
from nanotune.recipes import RECIPES


def chapter(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "chapters" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Stands in for the optimizer: keeps the gradients a step hands it and moves no weight."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{"lr": 0.0}], None
        self.defaults = {}                                     # not fused: clipping stays train_step's own

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        for p in self.model.parameters():
            p.grad = None


def steps_agree(model, batch, task, chapter_step, max_grad_norm):
    """(the chapter's loss, train.py's), after checking that their gradients agree."""
    torch.manual_seed(0)                                       # the same dropout masks for both
    recorder = Recorder(model)
    ours = chapter_step(model, recorder, batch)
    chapter_grads = recorder.grads
    torch.manual_seed(0)
    recorder = Recorder(model)
    summed, count, _ = train.train_step(model, [batch], recorder, 5e-5, task,
                                        max_grad_norm, torch.device("cpu"))
    assert chapter_grads.keys() == recorder.grads.keys()
    for name, grad in chapter_grads.items():
        assert (grad - recorder.grads[name]).abs().max() <= 1e-6 * max(1.0, grad.abs().max()), name
    return ours, float(summed) / count


@pytest.mark.parametrize("name, clip", [("ch1_introduction", 0.0), ("ch2_trainer_recipe", 1.0),
                                        ("ch5_mixing_data", 0.0)])
def test_a_language_model_chapter_steps_as_train_py_does(tiny_gpt2, name, clip):
    module, model, tokenizer = chapter(name), GPT2.from_pretrained(tiny_gpt2).train(), load_tokenizer(tiny_gpt2)
    texts = [e["text"] for e in read_examples(DATA / "anecdotes_jokes.txt")[:6]]
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), 64, tokenizer.eos_id)
    batch = make_batch("lm", sequences, labels, list(range(6)), tokenizer.pad_id, "cpu")
    extra = (5e-5,) if name == "ch2_trainer_recipe" else ()
    ours, theirs = steps_agree(model, batch, "lm", lambda m, o, b: module.step(m, o, b, *extra), clip)
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_the_bert_chapter_steps_as_train_py_does(tiny_bert):
    module = chapter("ch4_bert_classification")
    model = BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).train()
    tokenizer = load_tokenizer(tiny_bert)
    examples = read_examples(DATA / "sentiment_train.csv", with_labels=True)[:8]
    ids = [truncate(s, 128) for s in tokenizer.encode_batch([e["text"] for e in examples])]
    labels = [["negative", "positive"].index(e["label"]) for e in examples]
    batch = make_batch("classify", ids, labels, list(range(8)), tokenizer.pad_id, "cpu")
    ours, theirs = steps_agree(model, batch, "classify", lambda m, o, b: module.step(m, o, b, 5e-5), 1.0)
    assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("name, args", [
    ("ch1_introduction", ["--epochs", 1]), ("ch2_trainer_recipe", []), ("ch5_mixing_data", ["--epochs", 1]),
    ("ch4_bert_classification", ["--epochs", 1])])
def test_each_chapter_runs_top_to_bottom(tiny_gpt2, tiny_bert, name, args):
    model = tiny_bert if name.startswith("ch4") else tiny_gpt2
    r = run_cli(f"chapters/{name}.py", "--model", model, *args)
    assert r.returncode == 0, r.stderr
    assert "epoch 1: " in r.stdout or "step 10/" in r.stdout, r.stdout


# ---- each script runs top to bottom, with its chapter's numbers, and learns -----------------------

def settings(stdout):
    """The `settings: lr=... epochs=...` line a chapter script prints, as {name: text}."""
    line = next(line for line in stdout.splitlines() if line.startswith("settings: "))
    return dict(pair.split("=") for pair in line.removeprefix("settings: ").split())


def assert_recipe(stdout, name, **instead):
    """Every setting the script printed is its recipe's (or, where the model is too small for the
    recipe's length, the model's)."""
    shown = settings(stdout)
    assert shown, stdout
    for key, text in shown.items():
        expected = instead.get(key, RECIPES[name][key])
        assert type(expected)(text) == expected if not isinstance(expected, bool) else text == str(expected), key


def epoch_losses(stdout, word="loss"):
    return [float(line.split(f"{word} ")[1].split(",")[0]) for line in stdout.splitlines()
            if line.startswith("epoch ") and f"{word} " in line]


def test_ch1_shows_the_attention_mask_and_learns(tiny_gpt2, capsys):
    chapter("ch1_introduction").main(["--model", str(tiny_gpt2), "--data", str(DATA / "anecdotes_jokes.txt")])
    out = capsys.readouterr().out
    assert_recipe(out, "ch1", max_length=64)                     # the tiny model reads 64 positions, not 512
    ids, mask = (eval(line.split(":", 1)[1]) for line in out.splitlines()[:2])
    assert len(ids) == len(mask) and 0 in mask and mask == sorted(mask, reverse=True)   # real tokens, then padding
    losses = epoch_losses(out)
    assert len(losses) == RECIPES["ch1"]["epochs"] and losses[-1] < losses[0], out
