"""Chapter 5, Steps: mix general text with target-domain text, fine-tune on the mix, and see on
held-out text of both domains what the mix does, next to the target domain alone and general text alone.

    python chapters/ch5_mixing_data.py --general data/sentiment_train.csv --target data/anecdotes_jokes.txt

Fine-tuning on the target domain alone can make a model forget how ordinary text goes; some general
text in the mix keeps it in shape, and enough target-domain text is what teaches the new style. The
chapter joins two datasets (`ConcatDataset`); `mix` does the same, and with --weights 1 3 draws the
target three times as often as the general text (repeating the smaller one as needed). A tenth of
each source is held out, and the table at the end gives the loss on it before fine-tuning and after
each of the three runs (each from the same pre-trained weights). The numbers are in
nanotune/recipes.py (the chapter gives none: chapter 1's rate and epochs, chapter 2's weight decay).
tests/test_chapters.py checks that `step` computes the same loss and gradients as train.py's.
"""
import argparse
import random

import torch

from nanotune import GPT2, load_tokenizer
from nanotune.data import batch_order, lm_sequences, make_batch, mix, read_examples
from nanotune.evaluate import evaluate
from nanotune.losses import causal_lm_loss
from nanotune.optim import make_optimizer
from nanotune.recipes import RECIPES

RECIPE = RECIPES["ch5"]


def step(model, optimizer, batch):
    """Forward, the next-token loss over the logits, backward, update."""
    loss = causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def split(examples, seed=0):
    """(training texts, held-out texts): a tenth of the source, drawn at random, is never trained on."""
    texts = [e["text"] for e in examples]
    random.Random(seed).shuffle(texts)
    held = max(1, len(texts) // 10)
    return texts[held:], texts[:held]


def fine_tune(args, texts, device, name):
    """The pre-trained model, fine-tuned on `texts` (a fresh copy each time, so the runs compare)."""
    torch.manual_seed(0)
    model = GPT2.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.model)
    if not texts:
        return model
    max_length = min(RECIPE["max_length"], model.config.context)
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), max_length, tokenizer.eos_id)
    # AdamW with chapter 2's decay 0.01 on the matrices only. (torch.optim.AdamW(model.parameters())
    # would decay every LayerNorm gain and embedding row towards zero, its default being 0.01 too.)
    optimizer = make_optimizer(model, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    model.train()
    for epoch in range(args.epochs):
        losses = [step(model, optimizer, make_batch("lm", sequences, labels, indices, tokenizer.pad_id, device))
                  for indices in batch_order(len(sequences), RECIPE["batch_size"], seed=0, epoch=epoch)]
        print(f"{name}, epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}")
    return model


def held_out_loss(model, tokenizer, texts, device):
    max_length = min(RECIPE["max_length"], model.config.context)
    ids, labels, _ = lm_sequences(tokenizer.encode_batch(texts), max_length, tokenizer.eos_id)
    return evaluate(model, "lm", ids, labels, RECIPE["batch_size"], tokenizer.pad_id, device)["loss"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="Hub id or folder of a GPT-2 checkpoint")
    p.add_argument("--general", default="data/sentiment_train.csv",
                   help="general text (a 'text' column or a line each)")
    p.add_argument("--target", default="data/anecdotes_jokes.txt", help="the target domain's text")
    p.add_argument("--weights", type=float, nargs=2, default=None, metavar=("GENERAL", "TARGET"),
                   help="each source's share of the mix (default: everything once, as ConcatDataset)")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.model)
    print(f"settings: lr={RECIPE['lr']} epochs={args.epochs} batch_size={RECIPE['batch_size']}"
          f" weight_decay={RECIPE['weight_decay']}")

    # The two sources, each with a tenth held out; the training parts mixed into one set.
    general, general_held = split(read_examples(args.general))
    target, target_held = split(read_examples(args.target))
    mixed = [e["text"] for e in mix([[{"text": t} for t in general], [{"text": t} for t in target]],
                                    args.weights, seed=0)]
    print(f"{len(general)} general and {len(target)} target-domain texts to train on ({len(mixed)} in the mix);"
          f" {len(general_held)} and {len(target_held)} held out")

    runs = {"before fine-tuning": [], "target domain only": target, "general only": general, "mixed": mixed}
    table = {}
    for name, texts in runs.items():
        model = fine_tune(args, texts, device, name)
        table[name] = [held_out_loss(model, tokenizer, held, device) for held in (general_held, target_held)]

    # The lesson in numbers: the loss on text none of the runs trained on (lower is better).
    print(f"\n{'held-out loss':<22}{'general':>10}{'target':>10}")
    for name, (on_general, on_target) in table.items():
        print(f"{name:<22}{on_general:>10.4f}{on_target:>10.4f}")


if __name__ == "__main__":
    main()
