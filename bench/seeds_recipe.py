"""The seeds' own recipe end to end vs `python train.py` with its defaults: wall time, validation loss.

    python bench/seeds_recipe.py [--quick]

Both fine-tune the same GPT-2 checkpoint (124M architecture; tiny and 1 epoch with --quick) on the
same 90 % of data/anecdotes_jokes.txt for 3 epochs, batch 8, learning rate 5e-5 with linear decay:
- the seeds' recipe: `transformers` `Trainer`, every line padded to 512 tokens
  (`padding="max_length"`) and `DataCollatorForLanguageModeling(mlm=False)`;
- nanotune: `python train.py --model DIR --data data/anecdotes_jokes.txt`, nothing else.
Each runs in its own process, timed from start to exit (imports, loading, training, saving).
Then train.py's own `evaluate` scores both saved models on the same held-out 10 %.

The Hub is not reachable from every machine, so the weights are random and the tokenizer is a
byte-level BPE (GPT-2's kind) trained on the data: a line is ~20 tokens, as with GPT-2's own.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, ROOT, checkpoint, report

DATA = ROOT / "data" / "anecdotes_jokes.txt"


def model_folder(size):
    """The size's checkpoint plus a tokenizer for the data, in one Hub-layout folder."""
    folder = CACHE / f"gpt2-{size}-jokes"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import ByteLevelBPETokenizer
        source = checkpoint(size)
        folder.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            shutil.copy(f, folder / f.name)
        tk = ByteLevelBPETokenizer()
        tk.train_from_iterator(DATA.read_text().splitlines(), vocab_size=50257, special_tokens=["<|endoftext|>"], show_progress=False)
        tk.save(str(folder / "tokenizer.json"))
    return folder


def train_examples():
    """The split train.py makes by default (--val-split 0.1, --seed 42)."""
    from nanotune.data import read_examples, split
    return split(read_examples(DATA, "text", "label", False), 0.1, 42)


def run_seeds_recipe(folder, out, epochs):
    from transformers import (DataCollatorForLanguageModeling, GPT2LMHeadModel, PreTrainedTokenizerFast, Trainer,
                              TrainingArguments)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    train, _ = train_examples()
    rows = [tokenizer(e["text"], padding="max_length", truncation=True, max_length=512) for e in train]
    args = TrainingArguments(output_dir=str(out), num_train_epochs=epochs, per_device_train_batch_size=8, learning_rate=5e-5,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10)
    trainer = Trainer(model=GPT2LMHeadModel.from_pretrained(folder), args=args, train_dataset=rows,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    trainer.save_model(str(out))


def validation_loss(out):
    """train.py's evaluate() over the held-out lines, on the model saved in `out`."""
    from nanotune import GPT2, load_tokenizer
    from train import evaluate, tokenize
    model, tokenizer = GPT2.from_pretrained(out), load_tokenizer(out)
    _, val = train_examples()
    ids, _, _ = tokenize(val, tokenizer, "lm", model.config.n_positions, None, False)
    return evaluate(model, "lm", ids, None, 8, tokenizer.pad_id, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False), 0)["loss"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_seeds_recipe(Path(args.worker[0]), Path(args.worker[1]), int(args.worker[2]))
    size, epochs = ("tiny", 1) if args.quick else ("124M", 3)
    folder = model_folder(size)
    runs = {"seeds' recipe (Trainer, pad to 512)": [sys.executable, __file__, "--worker", str(folder), "{out}", str(epochs)],
            "nanotune (python train.py)": [sys.executable, str(ROOT / "train.py"), "--model", str(folder), "--data", str(DATA), "--out", "{out}"]
                                          + (["--epochs", str(epochs)] if epochs != 3 else [])}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, command in runs.items():
            out = Path(tmp) / name.split()[0]
            start = time.perf_counter()
            done = subprocess.run([c.replace("{out}", str(out)) for c in command], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            results[name] = (seconds, validation_loss(out))
            ratio = results[next(iter(runs))][0] / seconds
            rows.append([name, seconds, f"{results[name][1]:.3f}", f"{ratio:.1f}x"])
            print(rows[-1], flush=True)
    report(f"The seeds' recipe vs train.py defaults, GPT-2 {size}, data/anecdotes_jokes.txt, {epochs} epochs",
           ["run", "wall time s", "validation loss", "less wall time than the seeds' recipe"], rows)


if __name__ == "__main__":
    main()
