"""The chapters' two recipes end to end vs `python train.py` with its defaults: wall time, and how
good the saved models are.

    python bench/seeds_recipe.py [--recipe gpt2|bert] [--quick]

gpt2 (default): both fine-tune the same GPT-2 checkpoint (124M architecture; tiny and 1 epoch with
--quick) on the same 90 % of data/anecdotes_jokes.txt for 3 epochs, batch 8, learning rate 5e-5
with linear decay:
- the seeds' recipe: `transformers` `Trainer`, every line padded to 512 tokens
  (`padding="max_length"`) and `DataCollatorForLanguageModeling(mlm=False)`;
- nanotune: `python train.py --model DIR --data data/anecdotes_jokes.txt`, nothing else.
The Hub is not reachable from every machine, so the weights are random and the tokenizer is a
byte-level BPE (GPT-2's kind) trained on the data: a line is ~20 tokens, as with GPT-2's own.
Score: train.py's `evaluate` (validation loss) on the held-out 10 %.

bert: the classification chapter's recipe on the real all-MiniLM-L6-v2 checkpoint with a new
two-label head, on 300 reviews of realistic lengths (made from data/sentiment_*.csv, below: a median
of 88 tokens, a tenth over 243, 6 over 512 and truncated; 64 reviews and 1 epoch with --quick):
- the seeds' recipe: `Trainer`, the whole training set tokenized at once with `padding=True,
  truncation=True` (every text padded to the longest, 512 tokens), batch 32, weight decay 0.01,
  3 epochs, learning rate 5e-5 (Trainer's default), linear warm-up over the same share of the run
  as the chapter's 500 of its 2,344 steps (the chapter's 500 steps would outlast this whole run);
- nanotune: `python train.py --model MINILM --data reviews.csv` (batch 8, each batch padded to its
  own longest text), and the same with `--group-by-length`.
Score: validation loss and accuracy by train.py's `evaluate` on the held-out 10 %.

Each run is its own process, timed from start to exit (imports, loading, training, saving).
"""
import argparse
import csv
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, ROOT, checkpoint, minilm, peaks_note, report

JOKES = ROOT / "data" / "anecdotes_jokes.txt"
CHAPTER_WARMUP_SHARE = 500 / 2344      # warm-up steps of the chapter's run: IMDB's 25,000 reviews / 32 x 3 epochs


def gpt2_folder(size):
    """The size's checkpoint plus a tokenizer for the jokes, in one Hub-layout folder."""
    folder = CACHE / f"gpt2-{size}-jokes"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import ByteLevelBPETokenizer
        source = checkpoint(size)
        folder.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)
        tk = ByteLevelBPETokenizer()
        tk.train_from_iterator(JOKES.read_text().splitlines(), vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False)
        tk.save(str(folder / "tokenizer.json"))
    return folder


def reviews_file(count):
    """`count` reviews made of the sentences in data/sentiment_*.csv: each has a label and a number of
    sentences drawn from a log-normal (median 7, a few dozen at most), three quarters of them of its
    own sentiment, so lengths range from one sentence to past BERT's 512 tokens, as real reviews do."""
    path = CACHE / f"reviews-{count}.csv"
    if not path.is_file():
        pools = {}
        for name in ("sentiment_train.csv", "sentiment_val.csv"):
            for row in csv.DictReader(open(ROOT / "data" / name, newline="")):
                pools.setdefault(row["label"], []).append(row["text"])
        rng, labels = random.Random(0), sorted(pools)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["text", "label"])
            for _ in range(count):
                label = rng.choice(labels)
                other = next(l for l in labels if l != label)
                sentences = min(48, max(1, round(rng.lognormvariate(math.log(7), 0.9))))
                text = [rng.choice(pools[label] if i == 0 or rng.random() < 0.75 else pools[other]) for i in range(sentences)]
                out.writerow([" ".join(text), label])
    return path


def split_like_train_py(data, with_labels):
    """The split train.py makes by default (--val-split 0.1, --seed 42)."""
    from nanotune.data import read_examples, split
    return split(read_examples(data, "text", "label", with_labels), 0.1, 42)


def run_gpt2_recipe(folder, out, epochs):
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer,
                              TrainingArguments)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    train, _ = split_like_train_py(JOKES, False)
    rows = [tokenizer(e["text"], padding="max_length", truncation=True, max_length=512) for e in train]
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=5e-5,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10)
    trainer = Trainer(model=GPT2LMHeadModel.from_pretrained(folder), args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(str(out))


def run_bert_recipe(data, out, epochs):
    from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments
    train, _ = split_like_train_py(data, True)
    names = sorted({e["label"] for e in train})
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    encoded = tokenizer([e["text"] for e in train], padding=True, truncation=True)    # the whole set, padded to its longest
    rows = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": names.index(e["label"])}
            for ids, mask, types, e in zip(encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], train)]
    print(f"padded to {len(rows[0]['input_ids'])} tokens", flush=True)
    model = BertForSequenceClassification.from_pretrained(minilm(), num_labels=len(names), id2label=dict(enumerate(names)),
                                                          label2id={n: i for i, n in enumerate(names)})
    steps = epochs * math.ceil(len(rows) / 32)
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=32,
                             warmup_steps=round(CHAPTER_WARMUP_SHARE * steps), weight_decay=0.01, logging_steps=10,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))


def scores(out, data, task):
    """train.py's evaluate() over the held-out examples, on the model saved in `out`."""
    from nanotune import load_tokenizer
    from nanotune.models import load_model
    from nanotune.evaluate import evaluate
    from train import parse_args, tokenize
    model, tokenizer = load_model(out), load_tokenizer(out)
    labels = model.config.labels if task == "classify" else None
    _, val = split_like_train_py(data, task == "classify")
    length = model.config.n_positions if task == "lm" else model.config.max_position_embeddings
    ids, val_labels, _ = tokenize(val, tokenizer, task, length, labels, parse_args(["--data", str(data)]))
    return evaluate(model, task, ids, val_labels, 8, tokenizer.pad_id, torch.device("cpu"), len(labels or ()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--recipe", choices=["gpt2", "bert"], default="gpt2")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        recipe, source, out, epochs = args.worker
        return (run_gpt2_recipe if recipe == "gpt2" else run_bert_recipe)(Path(source), Path(out), int(epochs))
    epochs = 1 if args.quick else 3
    train_py = [sys.executable, str(ROOT / "train.py"), "--out", "{out}"] + (["--epochs", str(epochs)] if epochs != 3 else [])
    if args.recipe == "gpt2":
        size = "tiny" if args.quick else "124M"
        source, data, task = gpt2_folder(size), JOKES, "lm"
        title = f"GPT-2 {size}, data/anecdotes_jokes.txt"
        runs = {"seeds' recipe (Trainer, pad to 512)": "Trainer",
                "nanotune (python train.py)": train_py + ["--model", str(source), "--data", str(data)]}
    else:
        data = source = reviews_file(64 if args.quick else 300)
        task, title = "classify", f"all-MiniLM-L6-v2, {source.stem}.csv"
        runs = {"seeds' recipe (Trainer, pad to the longest, batch 32)": "Trainer",
                "nanotune (python train.py)": train_py + ["--model", str(minilm()), "--data", str(data)],
                "nanotune --group-by-length": train_py + ["--model", str(minilm()), "--data", str(data), "--group-by-length"]}
    peaks = peaks_note()
    print(peaks, flush=True)
    rows, first = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in runs.items():
            out = Path(tmp) / f"run{len(rows)}"
            if command == "Trainer":
                command = [sys.executable, __file__, "--worker", args.recipe, str(source), "{out}", str(epochs)]
            start = time.perf_counter()
            done = subprocess.run([c.replace("{out}", str(out)) for c in command], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            result, first = scores(out, data, task), first or seconds
            rows.append([name, seconds, f"{result['loss']:.3f}"] + ([f"{result['accuracy']:.3f}"] if task == "classify" else [])
                        + [f"{first / seconds:.1f}x"])
            print(rows[-1], flush=True)
    header = ["run", "wall time s", "validation loss"] + (["validation accuracy"] if task == "classify" else [])
    report(f"The seeds' recipe vs train.py defaults, {title}, {epochs} epochs ({peaks})",
           header + ["less wall time than the seeds' recipe"], rows)


if __name__ == "__main__":
    main()
