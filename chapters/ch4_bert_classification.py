"""Chapter 4, What is fine-tuning: BERT as a sentiment classifier, with dynamic padding and
truncation, then evaluated on held-out reviews.

    python chapters/ch4_bert_classification.py --model sentence-transformers/all-MiniLM-L6-v2

The chapter's recipe (IMDB there, the project's reviews here), from the table in
nanotune/recipes.py: 2 labels, batches of 32 for training and 64 for evaluation, warm-up over 500
steps (scaled down to this small set: see below), weight decay 0.01, 3 epochs, evaluation on the test
split. tests/test_chapters.py checks that `step` computes the same loss and gradients as train.py's,
and that with the real all-MiniLM-L6-v2 the script reaches at least 0.75 accuracy on the test split.
"""
import argparse

import torch

from nanotune import BertClassifier, load_tokenizer
from nanotune.data import batch_order, make_batch, read_examples, truncate
from nanotune.evaluate import evaluate
from nanotune.losses import classification_loss
from nanotune.optim import lr_at, make_optimizer
from nanotune.recipes import RECIPES

RECIPE = RECIPES["ch4"]


def step(model, optimizer, batch, lr):
    """One training step: the [CLS] summary's label scores, cross-entropy, backward, update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(batch["input_ids"], batch["attention_mask"])         # (B, 2): a score per label
    loss = classification_loss(logits, batch["labels"])                  # -log softmax(logits)[true label]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["max_grad_norm"])   # as Trainer does
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or folder of a BERT checkpoint")
    p.add_argument("--train", default="data/sentiment_train.csv")
    p.add_argument("--test", default="data/sentiment_val.csv")
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = read_examples(args.train, with_labels=True)
    test = read_examples(args.test, with_labels=True)
    names = sorted({e["label"] for e in train})                          # ["negative", "positive"]
    model = BertClassifier.from_pretrained(args.model, labels=names, device=device)   # a new head if it has none
    tokenizer = load_tokenizer(args.model)

    # Tokenize with truncation: BERT reads at most 512 positions, so a longer review keeps its first
    # 510 tokens between [CLS] and [SEP]. No padding yet: each batch is padded to its own longest
    # review (dynamic padding). The chapter's `map(tokenize, batched=True, batch_size=len(dataset))`
    # with `padding=True` pads the whole set to its longest review: most of a short review's batch
    # would be padding.
    context = model.config.max_position_embeddings
    encode = lambda examples: [truncate(ids, context) for ids in tokenizer.encode_batch([e["text"] for e in examples])]
    train_ids, test_ids = encode(train), encode(test)
    train_labels, test_labels = [names.index(e["label"]) for e in train], [names.index(e["label"]) for e in test]

    # AdamW, weight decay 0.01 on the matrices only (not on biases, LayerNorm gains or embeddings).
    optimizer = make_optimizer(model, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    batch_size, eval_batch_size = RECIPE["batch_size"], RECIPE["eval_batch_size"]
    total_steps = len(batch_order(len(train_ids), batch_size, seed=0, epoch=0)) * args.epochs
    # Warm-up: the chapter's 500 steps are two thirds of an epoch of IMDB's 25,000 reviews, a fifth of
    # its run. This set has 6 batches an epoch, and 500 steps would be 28 times the whole run: the rate
    # would still be near zero at the end, and BERT would seem not to learn. So the same idea at this
    # scale: warm up over a tenth of the run, never more than the chapter's 500.
    warmup_steps = min(RECIPE["warmup_steps"], total_steps // 10)
    print(f"settings: lr={optimizer.defaults['lr']} epochs={args.epochs} batch_size={batch_size}"
          f" eval_batch_size={eval_batch_size} warmup_steps={RECIPE['warmup_steps']}"
          f" weight_decay={optimizer.param_groups[0]['weight_decay']} lr_schedule={RECIPE['lr_schedule']}")
    print(f"warm-up: {warmup_steps} of {total_steps} steps (the chapter's {RECIPE['warmup_steps']}, scaled to this"
          " set: min(500, a tenth of the run))")
    done = 0
    for epoch in range(args.epochs):
        model.train()
        for indices in batch_order(len(train_ids), batch_size, seed=0, epoch=epoch):
            lr = lr_at(done, RECIPE["lr"], warmup_steps, total_steps, RECIPE["lr_schedule"])   # then linear decay
            batch = make_batch("classify", train_ids, train_labels, indices, tokenizer.pad_id, device)
            step(model, optimizer, batch, lr)
            done += 1
        # Evaluation on the test split, in batches of 64, dropout off.
        scores = evaluate(model, "classify", test_ids, test_labels, eval_batch_size, tokenizer.pad_id, device,
                          len(names))
        print(f"epoch {epoch + 1}: test loss {scores['loss']:.4f}, accuracy {scores['accuracy']:.4f}")


if __name__ == "__main__":
    main()
