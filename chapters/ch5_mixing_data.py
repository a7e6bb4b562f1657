"""Chapter 5, Steps: mix general text with target-domain text, then fine-tune on the mix.

    python chapters/ch5_mixing_data.py --general data/sentiment_train.csv --target data/anecdotes_jokes.txt

Fine-tuning on the target domain alone can make a model forget how ordinary text goes; some general
text in the mix keeps it in shape, and enough target-domain text is what teaches the new style.
The chapter joins two datasets (`ConcatDataset`); `mix` does the same, and with --weights 1 3 draws
the target three times as often as the general text (repeating the smaller one as needed).
tests/test_chapters.py checks that `step` computes the same loss and gradients as train.py's.
"""
import argparse

import torch

from nanotune import GPT2, load_tokenizer
from nanotune.data import batch_order, lm_sequences, make_batch, mix, read_examples
from nanotune.evaluate import evaluate
from nanotune.losses import causal_lm_loss


def step(model, optimizer, batch):
    """Forward, the next-token loss over the logits, backward, update."""
    loss = causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="Hub id or folder of a GPT-2 checkpoint")
    p.add_argument("--general", default="data/sentiment_train.csv",
                   help="general text (a 'text' column or a line each)")
    p.add_argument("--target", default="data/anecdotes_jokes.txt", help="the target domain's text")
    p.add_argument("--weights", type=float, nargs=2, default=None, metavar=("GENERAL", "TARGET"),
                   help="each source's share of the mix (default: everything once, as ConcatDataset)")
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = GPT2.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.model)

    # The two sources, mixed into one training set.
    general, target = read_examples(args.general), read_examples(args.target)
    texts = [example["text"] for example in mix([general, target], args.weights, seed=0)]
    print(f"{len(general)} general and {len(target)} target-domain texts: {len(texts)} in the mix")
    max_length = min(512, model.config.context)
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), max_length, tokenizer.eos_id)

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    for epoch in range(args.epochs):
        losses = [step(model, optimizer, make_batch("lm", sequences, labels, indices, tokenizer.pad_id, device))
                  for indices in batch_order(len(sequences), 8, seed=0, epoch=epoch)]
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}")

    # How well does it now model each domain? The loss on the first 64 texts of each (lower is better).
    for name, source in (("general", general), ("target", target)):
        ids, lab, _ = lm_sequences(tokenizer.encode_batch([e["text"] for e in source[:64]]), max_length,
                                   tokenizer.eos_id)
        print(f"{name} text: loss {evaluate(model, 'lm', ids, lab, 8, tokenizer.pad_id, device)['loss']:.4f}")


if __name__ == "__main__":
    main()
