"""The chapters' scripts (chapters/) run top to bottom with their chapter's numbers (nanotune/recipes.py)
and learn, and each one's training step computes what train.py's step computes on the same batch: the
same loss and the same gradients. So the book's plain recipe and the tool cannot drift apart."""
import importlib.util
import statistics

import pytest
import torch
from conftest import DATA, ROOT

import train
from nanotune import GPT2, BertClassifier, load_tokenizer
from nanotune.data import lm_sequences, make_batch, read_examples, truncate
from nanotune.lora import DEFAULT_TARGETS, LoRAConfig, add_lora
from nanotune.optim import unfreeze_gradually
from nanotune.quantize import QuantConfig, quantize_linears
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
                                        ("ch5_mixing_data", 0.0), ("quantize_and_lora", 0.0)])
def test_a_language_model_chapter_steps_as_train_py_does(tiny_gpt2, name, clip):
    module, model, tokenizer = chapter(name), GPT2.from_pretrained(tiny_gpt2).train(), load_tokenizer(tiny_gpt2)
    if name == "quantize_and_lora":                            # 4-bit linears with adapters: only these train
        add_lora(quantize_linears(model, QuantConfig("4bit")), LoRAConfig(DEFAULT_TARGETS["gpt2"], 8, 16, 0.05))
        model.train()
    texts = [e["text"] for e in read_examples(DATA / "anecdotes_jokes.txt")[:6]]
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), 64, tokenizer.eos_id)
    batch = make_batch("lm", sequences, labels, list(range(6)), tokenizer.pad_id, "cpu")
    extra = (5e-5,) if name == "ch2_trainer_recipe" else ()
    ours, theirs = steps_agree(model, batch, "lm", lambda m, o, b: module.step(m, o, b, *extra), clip)
    assert ours == pytest.approx(theirs, abs=1e-6)


@pytest.mark.parametrize("name", ["ch4_bert_classification", "ch17_transfer_learning"])
def test_a_bert_chapter_steps_as_train_py_does(tiny_bert, name):
    module = chapter(name)
    model = BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).train()
    if name == "ch17_transfer_learning":                       # partly frozen, as in its first epochs
        unfreeze_gradually(model, list(model.named_parameters()), 1)
    tokenizer = load_tokenizer(tiny_bert)
    examples = read_examples(DATA / "sentiment_train.csv", with_labels=True)[:8]
    ids = [truncate(s, 128) for s in tokenizer.encode_batch([e["text"] for e in examples])]
    labels = [["negative", "positive"].index(e["label"]) for e in examples]
    batch = make_batch("classify", ids, labels, list(range(8)), tokenizer.pad_id, "cpu")
    ours, theirs = steps_agree(model, batch, "classify", lambda m, o, b: module.step(m, o, b, 5e-5), 1.0)
    assert ours == pytest.approx(theirs, abs=1e-6)


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


def test_ch2_runs_trainers_recipe_and_learns(tiny_gpt2, tmp_path, capsys):
    jokes = tmp_path / "jokes.txt"                                # 150 of the jokes: 150 steps of batch 1
    jokes.write_text("\n".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:150]) + "\n")
    chapter("ch2_trainer_recipe").main(["--model", str(tiny_gpt2), "--data", str(jokes)])
    out = capsys.readouterr().out
    assert_recipe(out, "ch2")
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    total = int(steps[0].split("/")[1].split(":")[0])                          # a step per text (batches of 1)
    assert len(steps) == total // 10                                           # logging_steps=10
    logged = [float(line.split("loss ")[1].split(",")[0]) for line in steps]
    half = len(logged) // 2                  # each log is 10 texts' loss, different ones: compare the halves' medians
    assert statistics.median(logged[half:]) < statistics.median(logged[:half]), out
    assert out.rstrip().splitlines()[-1].startswith("Once upon a time, in the legendary kingdom of Camelot,")


def test_ch4_keeps_the_chapters_warm_up_beside_the_one_this_set_needs(tiny_bert, capsys):
    chapter("ch4_bert_classification").main(["--model", str(tiny_bert), "--train", str(DATA / "sentiment_train.csv"),
                                             "--test", str(DATA / "sentiment_val.csv")])
    out = capsys.readouterr().out
    assert_recipe(out, "ch4")                                     # warmup_steps=500, as the chapter
    assert "warm-up: 1 of 18 steps (the chapter's 500" in out     # 190 reviews: 6 batches of 32 an epoch, 3 epochs
    assert len(epoch_losses(out, "test loss")) == 3


def test_ch4_learns_sentiment_on_the_shipped_reviews(minilm_dir, capsys):
    """The real all-MiniLM-L6-v2 with the chapter's recipe, a new head, 190 reviews: the test split's
    accuracy after 3 epochs. With the chapter's 500 warm-up steps unscaled it stays near chance (0.52-0.56)."""
    chapter("ch4_bert_classification").main(["--model", str(minilm_dir), "--train", str(DATA / "sentiment_train.csv"),
                                             "--test", str(DATA / "sentiment_val.csv")])
    out = capsys.readouterr().out
    accuracy = epoch_losses(out, "accuracy")
    assert len(accuracy) == 3 and accuracy[-1] >= 0.75, out


def test_ch5_prints_before_target_general_and_mixed_on_held_out_text(tiny_gpt2, capsys):
    chapter("ch5_mixing_data").main(["--model", str(tiny_gpt2), "--general", str(DATA / "sentiment_train.csv"),
                                     "--target", str(DATA / "anecdotes_jokes.txt"), "--epochs", "1"])
    out = capsys.readouterr().out
    assert_recipe(out, "ch5", epochs=1)                           # three runs: one epoch each is enough to see it
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("held-out loss")))
    assert lines[header].split()[-2:] == ["general", "target"]
    table = {line[:22].strip(): [float(x) for x in line[22:].split()] for line in lines[header + 1:header + 5]}
    assert list(table) == ["before fine-tuning", "target domain only", "general only", "mixed"]
    assert all(len(row) == 2 for row in table.values())
    assert table["target domain only"][1] < table["before fine-tuning"][1]     # fine-tuning lowers the target loss
    assert table["mixed"][1] < table["before fine-tuning"][1]
    assert table["general only"][0] < table["before fine-tuning"][0]


def test_quantize_and_lora_measures_the_swap_trains_the_adapters_and_merges(tiny_gpt2, capsys):
    chapter("quantize_and_lora").main(["--model", str(tiny_gpt2), "--data", str(DATA / "anecdotes_jokes.txt"),
                                       "--epochs", "1"])
    out = capsys.readouterr().out
    assert_recipe(out, "qlora", max_length=64, epochs=1)          # one epoch: 4-bit layers are slow on a CPU
    memory = out.split("memory: ")[1].split(" MiB")
    full, quantized = float(memory[0]), float(memory[1].split()[-1])
    assert quantized < full, out                                                    # the linears in 4 bits
    assert "fidelity: logits differ by at most " in out
    quantized = float(out.split("fidelity: ")[1].split(" quantized")[0].split()[-1])    # before LoRA trains
    held_out = [float(line.split("held-out loss ")[1]) for line in out.splitlines() if line.startswith("epoch ")]
    assert len(held_out) == 1 and held_out[-1] < quantized, out
    merged = out.split("merged: ")[1]
    assert abs(float(merged.split("held-out loss ")[1].split()[0]) - held_out[-1]) < 1e-3   # merging changes nothing


def test_ch17_replaces_the_head_adds_tokens_and_unfreezes_gradually(tiny_bert, capsys):
    chapter("ch17_transfer_learning").main(["--model", str(tiny_bert), "--train", str(DATA / "sentiment_train.csv"),
                                            "--test", str(DATA / "sentiment_val.csv")])
    out = capsys.readouterr().out
    assert_recipe(out, "ch17")
    grew = out.split("the embedding grew from ")[1].split()
    assert int(grew[2].replace(",", "")) == int(grew[0].replace(",", "")) + 3, out   # a row for each new token
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [e.split("(")[1].split(":")[0] for e in epochs] == ["the head only", "from block 1 up", "from block 0 up"]
    trained = [int(e.split(": ")[1].split()[0].replace(",", "")) for e in epochs]
    assert trained == sorted(trained) and trained[0] < trained[-1]                # more of the body each epoch
    losses = epoch_losses(out)
    assert losses[-1] < losses[0], out


@pytest.mark.parametrize("name", ["ch1_introduction", "ch2_trainer_recipe", "ch4_bert_classification",
                                  "ch5_mixing_data", "quantize_and_lora", "ch17_transfer_learning"])
def test_each_scripts_help_says_what_it_does_in_whole_sentences(name, capsys):
    with pytest.raises(SystemExit):
        chapter(name).main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.startswith("Chapter") or name == "quantize_and_lora"
    assert description.rstrip().endswith((".", ".\"")), description


def test_train_py_recipe_fills_in_what_the_command_line_leaves_out(capsys):
    args = train.parse_args(["--data", "x.csv", "--recipe", "ch4", "--lr", "1e-4", "--warmup=2"])
    said = capsys.readouterr().out
    assert (args.lr, args.warmup_steps) == (1e-4, 2)                                   # given: kept
    for name in ("epochs", "batch_size", "weight_decay", "lr_schedule", "max_grad_norm"):
        assert getattr(args, name) == RECIPES["ch4"][name], name
    assert said.startswith("recipe ch4 (chapter 4,") and "--batch-size 32" in said and "--lr " not in said
    args = train.parse_args(["--data", "x.txt", "--recipe", "ch17"])
    assert args.unfreeze == "gradual" and args.new_head and args.warmup_steps == 0
