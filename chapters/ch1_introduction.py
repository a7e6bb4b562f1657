"""Chapter 1, Introduction: fine-tune a pre-trained GPT-2 on anecdotes and jokes, then sample.

The chapter's four steps, written with nanotune's pieces and run top to bottom:

    python chapters/ch1_introduction.py                     # gpt2 from the Hub (or its local cache)
    python chapters/ch1_introduction.py --model out/ --epochs 1

Change anything: this file is yours to edit. train.py does the same job with everything a real run
needs around it (validation, checkpoints, LoRA, ...); tests/test_chapters.py checks that the step
below computes the same loss and gradients as train.py's. The numbers are chapter 1's, from the
table in nanotune/recipes.py (`train.py --recipe ch1` uses the same).
"""
import argparse

import torch

from nanotune import GPT2, load_tokenizer
from nanotune.data import batch_order, lm_sequences, make_batch, read_examples
from nanotune.generation import generate
from nanotune.losses import causal_lm_loss
from nanotune.recipes import RECIPES

RECIPE = RECIPES["ch1"]


def step(model, optimizer, batch):
    """The chapter's training step: forward, loss over the logits, backward, update."""
    logits = model(batch["input_ids"], batch["attention_mask"])      # (B, T, vocab): a score for every next token
    # Cross-entropy of each position's scores against the token that comes NEXT (the labels shifted
    # one place; the chapter's own loop compares each position with itself, which teaches nothing).
    loss = causal_lm_loss(logits, batch["labels"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="Hub id or folder of a GPT-2 checkpoint")
    p.add_argument("--data", default="data/anecdotes_jokes.txt")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Step 1: load the pre-trained model and its tokenizer.
    model = GPT2.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.model)

    # Step 2: load the data, one anecdote or joke a line.
    texts = [example["text"] for example in read_examples(args.data)]

    # Step 3: tokenize, at most 512 tokens (the chapter's max length; GPT-2 reads up to 1,024). Each
    # text ends with the end-of-text token, so the model learns where a joke stops. The chapter pads
    # every text to 512; a joke is about 40 tokens, so over nine tenths of that compute would go to
    # padding. Here each batch is padded to its own longest text (make_batch: dynamic padding), and
    # the attention mask keeps the model from looking at the padding.
    max_length = min(RECIPE["max_length"], model.config.context)
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), max_length, tokenizer.eos_id)
    # What the chapter's batch_encode_plus returns, for one text of the first batch: its ids, padded
    # to the batch's longest, and the attention mask, 1 for a real token and 0 for padding.
    first = make_batch("lm", sequences, labels, batch_order(len(sequences), args.batch_size, seed=0, epoch=0)[0],
                       tokenizer.pad_id, device)
    row = int(first["attention_mask"].sum(1).argmin())                 # the shortest text: the most padding
    print("input_ids:     ", first["input_ids"][row].tolist())
    print("attention_mask:", first["attention_mask"][row].tolist())

    # Step 4: fine-tune: Adam at 5e-5, cross-entropy, 3 epochs.
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    print(f"settings: lr={optimizer.defaults['lr']} epochs={args.epochs} batch_size={args.batch_size}"
          f" max_length={max_length}")
    model.train()                                                   # dropout on
    for epoch in range(args.epochs):
        losses = []
        for indices in batch_order(len(sequences), args.batch_size, seed=0, epoch=epoch):   # a new order each epoch
            batch = make_batch("lm", sequences, labels, indices, tokenizer.pad_id, device)
            losses.append(step(model, optimizer, batch))
        print(f"epoch {epoch + 1}: loss {sum(losses) / len(losses):.4f}")

    # And see what it learned: sample a continuation (temperature 0.7, as chapter 2 does).
    model.eval()                                                    # dropout off
    prompt = tokenizer.encode("My grandmother")
    new = generate(model, [prompt], 40, tokenizer.pad_id, tokenizer.eos_id, temperature=0.7, top_k=50)[0]
    print("My grandmother" + tokenizer.decode(new))


if __name__ == "__main__":
    main()
