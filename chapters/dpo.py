"""Preference tuning with DPO, top to bottom: pairs -> chat template -> log-probabilities ->
reference -> loss -> step.

    python chapters/dpo.py --model MODEL_OR_GGUF          # data/joke_pairs.jsonl, a chat model

Each row of the data holds a prompt and two answers, one chosen and one rejected. DPO raises the
model's log-probability of the chosen answer relative to the rejected one, each measured against
a frozen reference (the model before this training): reward = beta * (log p - log p_ref), loss =
-log sigmoid(reward(chosen) - reward(rejected)). tests/test_dpo.py checks that `step` computes the
same loss and gradients as train.py's step (`python train.py --model M --data pairs.jsonl`).
"""
import argparse

import torch

from nanotune import load_tokenizer
from nanotune.data import batch_order, make_batch, read_examples
from nanotune.losses import IGNORE, next_token_labels
from nanotune.models import load_model
from nanotune.optim import make_optimizer
from nanotune.preference import dpo_loss, render_pairs, sequence_logps, tokenize_pairs, without_dropout


def logps_of(model, batch):
    """log p(answer | prompt) of each of the batch's 2B rows (the B chosen, then the B rejected)."""
    logits = model(batch["input_ids"], batch["attention_mask"])            # (2B, T, vocab)
    labels = next_token_labels(batch["labels"])                            # position t predicts token t + 1
    return sequence_logps(logits, labels, labels != IGNORE)                # summed over the answer's tokens


def step(model, optimizer, batch, beta=0.1):
    """One DPO step: both answers' log-probabilities in one forward pass, the loss against the
    reference's (which came with the batch), backward, clip, update. Returns (loss, reward accuracy)."""
    chosen, rejected = logps_of(model, batch).chunk(2)
    ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
    loss = losses.mean()                                                   # a mean over pairs, not tokens
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)               # one odd pair must not undo pre-training
    optimizer.step()
    optimizer.zero_grad()
    return loss.item(), (chosen_rewards > rejected_rewards).float().mean().item()


@torch.no_grad()
def add_reference(model, pairs, batch_size, pad_id):
    """The reference: the model as it is now, before any step. Its log-probabilities of both answers
    are computed once and kept with each pair, so no second copy of the model sits in memory."""
    model.eval()
    for indices in batch_order(len(pairs), batch_size, seed=0, epoch=0, shuffle=False):
        logps = logps_of(model, make_batch("dpo", pairs, None, indices, pad_id, "cpu")).tolist()
        for k, i in enumerate(indices):
            pairs[i].ref = (logps[k], logps[len(indices) + k])
    model.train()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="Hub id, folder or .gguf of a chat model (GPT-2 or the Llama family)")
    p.add_argument("--data", default="data/joke_pairs.jsonl")
    p.add_argument("--chat-template", help="a template file or chatml, for a model without its own")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (twice as many rows)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)

    # 1. The pairs, written as the model reads a conversation: the prompt through its chat template
    # and the generation prompt, each answer as what the template writes after it.
    examples = read_examples(args.data)
    render_pairs(examples, [], tokenizer, args.model, args.chat_template)
    pairs = tokenize_pairs(examples, tokenizer, max_length=min(256, model.config.context))[0]

    # 2. Dropout off: the model and its reference must be the same function at the first step
    # (every reward 0, the loss ln 2); then the reference's log-probabilities, once.
    without_dropout(model)
    add_reference(model, pairs, args.batch_size, tokenizer.pad_id)

    # 3. Train. A small rate: DPO's gradient grows with how wrong the model is about a pair, and
    # the reference only anchors the loss, not the weights.
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=0.0)
    done, losses, accuracies = 0, [], []
    for epoch in range(args.epochs):
        for indices in batch_order(len(pairs), args.batch_size, seed=0, epoch=epoch):
            batch = make_batch("dpo", pairs, None, indices, tokenizer.pad_id, "cpu")
            loss, accuracy = step(model, optimizer, batch, args.beta)
            losses.append(loss)
            accuracies.append(accuracy)
            done += 1
            if done % 10 == 0:          # the loss starts at ln 2 = 0.6931; accuracy: chosen reward above rejected
                print(f"step {done}: loss {sum(losses[-10:]) / 10:.4f},"
                      f" reward accuracy {sum(accuracies[-10:]) / 10:.2f}")


if __name__ == "__main__":
    main()
