"""Chapter 2, Overview: the chapter's `Trainer` recipe for GPT-2 written as a plain loop, then
`generate` from "Once upon a time, in the legendary kingdom of Camelot,".

    python chapters/ch2_trainer_recipe.py                   # gpt2 from the Hub (or its local cache)

What `Trainer(args=TrainingArguments(num_train_epochs=1, per_device_train_batch_size=1,
warmup_steps=100, weight_decay=0.01, logging_steps=10))` does, step by step: AdamW at 5e-5 with
decoupled weight decay, a rate that rises over 100 steps and falls linearly to zero, gradients
clipped to norm 1.0, the loss logged every 10 steps. The numbers are chapter 2's, from the table in
nanotune/recipes.py (`train.py --recipe ch2`). tests/test_chapters.py checks that `step` computes
the same loss and gradients as train.py's step.
"""
import argparse

import torch

from nanotune import GPT2, load_tokenizer
from nanotune.data import batch_order, lm_sequences, make_batch, read_examples
from nanotune.generation import generate
from nanotune.losses import causal_lm_loss
from nanotune.optim import lr_at
from nanotune.recipes import RECIPES

RECIPE = RECIPES["ch2"]


def step(model, optimizer, batch, lr):
    """One of Trainer's steps: forward, loss, backward, clip, update at the schedule's rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = causal_lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    # One odd example can give a huge gradient; clipping its norm to 1.0 (Trainer's max_grad_norm)
    # keeps a single step from undoing what pre-training learned.
    torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["max_grad_norm"])
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
    model = GPT2.from_pretrained(args.model, device=device)
    tokenizer = load_tokenizer(args.model)
    texts = [example["text"] for example in read_examples(args.data)]
    sequences, labels, _ = lm_sequences(tokenizer.encode_batch(texts), model.config.context, tokenizer.eos_id)

    # AdamW with Trainer's two groups: weight decay 0.01 on every weight but the biases and the
    # LayerNorm gains (for GPT-2, exactly the 1-D ones); the token and position embeddings decay too.
    # (train.py, through optim.make_optimizer, spares the embeddings as well: decaying a rare token's
    # row towards zero only erases what pre-training learned about it.)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": RECIPE["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=RECIPE["lr"])
    steps_per_epoch = len(batch_order(len(sequences), args.batch_size, seed=0, epoch=0))
    total_steps, done, losses = steps_per_epoch * args.epochs, 0, []
    print(f"settings: lr={optimizer.defaults['lr']} epochs={args.epochs} batch_size={args.batch_size}"
          f" warmup_steps={RECIPE['warmup_steps']} weight_decay={optimizer.param_groups[0]['weight_decay']}"
          f" lr_schedule={RECIPE['lr_schedule']} max_grad_norm={RECIPE['max_grad_norm']}")
    model.train()
    for epoch in range(args.epochs):
        for indices in batch_order(len(sequences), args.batch_size, seed=0, epoch=epoch):
            # Warm-up: the first 100 steps start from a tiny rate, so that the first, noisiest
            # gradients (with AdamW's moments still empty) cannot jolt the pre-trained weights.
            lr = lr_at(done, RECIPE["lr"], RECIPE["warmup_steps"], total_steps, RECIPE["lr_schedule"])
            batch = make_batch("lm", sequences, labels, indices, tokenizer.pad_id, device)
            losses.append(step(model, optimizer, batch, lr))
            done += 1
            if done % 10 == 0:                                          # logging_steps=10
                print(f"step {done}/{total_steps}: loss {sum(losses[-10:]) / 10:.4f}, lr {lr:.2e}")

    # generate(max_length=100, temperature=0.7, do_sample=True). The chapter's max_length counts the
    # prompt's tokens too (generate.py's --max-new-tokens does not): 100 minus the prompt's length
    # new tokens. Hugging Face's generate also keeps the 50 most likely tokens (top_k=50) by default.
    model.eval()
    prompt = "Once upon a time, in the legendary kingdom of Camelot,"
    ids = tokenizer.encode(prompt)
    new = generate(model, [ids], RECIPE["max_total_length"] - len(ids), tokenizer.pad_id, tokenizer.eos_id,
                   temperature=RECIPE["temperature"], top_k=50)[0]
    print(prompt + tokenizer.decode(new))


if __name__ == "__main__":
    main()
