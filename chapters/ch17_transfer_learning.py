"""Chapter 17, Conclusion: transfer learning. A pre-trained BERT body with a new last layer for the
task, new whole tokens with the embedding grown to hold them, and the body unfrozen gradually.

    python chapters/ch17_transfer_learning.py --model sentence-transformers/all-MiniLM-L6-v2

Three of the chapter's transfer-learning steps, top to bottom: replace the last layer (a classifier
head for the data's labels, drawn anew: `new_head=True`); add tokens the tokenizer would cut into
many pieces and resize the token embedding to match (`new_tokens.add_tokens`,
`resize_token_embeddings`); train the head alone first, then one more block down each epoch
(`optim.unfreeze_gradually`, ULMFiT's gradual unfreezing). The numbers are the `ch17` row of
nanotune/recipes.py (`train.py --recipe ch17`). tests/test_chapters.py checks that `step` computes
the same loss and gradients as train.py's.
"""
import argparse
from collections import Counter

import torch

from nanotune import BertClassifier, load_tokenizer
from nanotune.data import batch_order, make_batch, read_examples, truncate
from nanotune.evaluate import evaluate
from nanotune.losses import classification_loss
from nanotune.new_tokens import add_tokens, input_embedding, resize_token_embeddings, train_rows_only
from nanotune.optim import layers_of, lr_at, make_optimizer, unfreeze_gradually
from nanotune.recipes import RECIPES

RECIPE = RECIPES["ch17"]


def step(model, optimizer, batch, lr):
    """Chapter 4's step: the label scores, cross-entropy, backward, clip, update. Frozen weights
    get no gradient, so the optimizer leaves them (and their moments) exactly as they are."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = classification_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], RECIPE["max_grad_norm"])
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def most_split_words(tokenizer, texts, count):
    """The `count` most frequent words that the tokenizer cuts into three or more pieces: each costs
    several positions and is read through pieces that mean little on their own."""
    words = Counter(w for text in texts for w in text.lower().split() if w.isalpha())
    split = [w for w, _ in words.most_common() if len(tokenizer.encode(w, add_special_tokens=False)) >= 3]
    return split[:count]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or folder of a BERT checkpoint")
    p.add_argument("--train", default="data/sentiment_train.csv")
    p.add_argument("--test", default="data/sentiment_val.csv")
    p.add_argument("--new-tokens", type=int, default=3, help="how many often-split words become whole tokens")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = read_examples(args.train, with_labels=True)
    test = read_examples(args.test, with_labels=True)
    names = sorted({e["label"] for e in train})

    # 1. Replace the last layer: the pre-trained body, and a new head with one score per label (its
    # weights drawn from N(0, 0.02), its bias zero), even where the checkpoint has a head of its own.
    model = BertClassifier.from_pretrained(args.model, labels=names, device=device, new_head=True)
    tokenizer = load_tokenizer(args.model)

    # 2. New tokens: whole words for the ones the vocabulary lacks, and as many new embedding rows,
    # each starting as the mean of the others (a token the model already finds unremarkable).
    words = most_split_words(tokenizer, [e["text"] for e in train], args.new_tokens)
    before = model.config.vocab_size
    ids = add_tokens(tokenizer, words)
    rows = resize_token_embeddings(model, tokenizer.vocab_size)
    new = [i for i in ids if i >= before]                              # (a word already in the vocabulary keeps its id)
    print(f"new tokens: {', '.join(f'{w!r} ({i})' for w, i in zip(words, ids))}; the embedding grew from"
          f" {before:,} to {rows:,} rows")

    context = model.config.max_position_embeddings
    encode = lambda examples: [truncate(i, context) for i in tokenizer.encode_batch([e["text"] for e in examples])]
    train_ids, test_ids = encode(train), encode(test)
    train_labels, test_labels = [names.index(e["label"]) for e in train], [names.index(e["label"]) for e in test]

    # 3. The optimizer holds every weight that will train at some point; gradual unfreezing then
    # decides, epoch by epoch, which of them do.
    optimizer = make_optimizer(model, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    may_train = list(model.named_parameters())
    # The new rows know nothing yet, so they train from the first epoch, while the embedding's
    # pre-trained rows stay as they are (their gradient is zeroed), even once the embeddings unfreeze.
    _, embedding = input_embedding(model)
    if new:
        train_rows_only(embedding, new)
    epochs, batch_size = RECIPE["epochs"], RECIPE["batch_size"]
    total_steps = len(batch_order(len(train_ids), batch_size, seed=0, epoch=0)) * epochs
    print(f"settings: lr={optimizer.defaults['lr']} epochs={epochs} batch_size={batch_size}"
          f" weight_decay={RECIPE['weight_decay']} warmup_steps={RECIPE['warmup_steps']}"
          f" unfreeze={RECIPE['unfreeze']}")
    done = 0
    for epoch in range(epochs):
        # The new head first learns on features that stay put; then each epoch one more block down
        # may adapt, the blocks nearest the input (the most general features) last.
        lowest = unfreeze_gradually(model, may_train, epoch)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and p is not embedding.weight)
        embedding.weight.requires_grad_(bool(new))                      # its new rows only
        trainable += len(new) * embedding.weight.shape[1]
        what = "the head only" if lowest > layers_of(model) else f"from block {lowest - 1} up" if lowest else "all"
        model.train()
        losses = []
        for indices in batch_order(len(train_ids), batch_size, seed=0, epoch=epoch):
            lr = lr_at(done, RECIPE["lr"], RECIPE["warmup_steps"], total_steps, RECIPE["lr_schedule"])
            batch = make_batch("classify", train_ids, train_labels, indices, tokenizer.pad_id, device)
            losses.append(step(model, optimizer, batch, lr))
            done += 1
        scores = evaluate(model, "classify", test_ids, test_labels, batch_size, tokenizer.pad_id, device, len(names))
        print(f"epoch {epoch + 1} ({what}: {trainable:,} weights): loss {sum(losses) / len(losses):.4f},"
              f" test accuracy {scores['accuracy']:.4f}")


if __name__ == "__main__":
    main()
