"""Chapter 4, What is fine-tuning: BERT as a sentiment classifier, with dynamic padding and
truncation, then evaluated on held-out reviews.

    python chapters/ch4_bert_classification.py --model sentence-transformers/all-MiniLM-L6-v2

The chapter's recipe (IMDB there, the project's reviews here): 2 labels, batches of 32 for training
and 64 for evaluation, warm-up over 500 steps, weight decay 0.01, 3 epochs, evaluation on the test
split. tests/test_chapters.py checks that `step` computes the same loss and gradients as train.py's.
"""
import argparse

import torch

from nanotune import BertClassifier, load_tokenizer
from nanotune.data import batch_order, make_batch, read_examples, truncate
from nanotune.evaluate import evaluate
from nanotune.losses import classification_loss
from nanotune.optim import lr_at, make_optimizer


def step(model, optimizer, batch, lr):
    """One training step: the [CLS] summary's label scores, cross-entropy, backward, update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits = model(batch["input_ids"], batch["attention_mask"])         # (B, 2): a score per label
    loss = classification_loss(logits, batch["labels"])                  # -log softmax(logits)[true label]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)               # as Trainer does
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base-uncased", help="Hub id or folder of a BERT checkpoint")
    p.add_argument("--train", default="data/sentiment_train.csv")
    p.add_argument("--test", default="data/sentiment_val.csv")
    p.add_argument("--epochs", type=int, default=3)
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
    # review (dynamic padding), not every review to 512, which for short reviews is mostly padding.
    context = model.config.max_position_embeddings
    encode = lambda examples: [truncate(ids, context) for ids in tokenizer.encode_batch([e["text"] for e in examples])]
    train_ids, test_ids = encode(train), encode(test)
    train_labels, test_labels = [names.index(e["label"]) for e in train], [names.index(e["label"]) for e in test]

    optimizer = make_optimizer(model, lr=5e-5, weight_decay=0.01)        # AdamW, decay on the matrices only
    total_steps = len(batch_order(len(train_ids), 32, seed=0, epoch=0)) * args.epochs
    done = 0
    for epoch in range(args.epochs):
        model.train()
        for indices in batch_order(len(train_ids), 32, seed=0, epoch=epoch):
            # Warm-up over 500 steps (more than this small set has: the rate is still rising at the
            # end; on IMDB's 25,000 reviews it is the first 2/3 of an epoch), then linear decay.
            lr = lr_at(done, 5e-5, warmup_steps=500, total_steps=total_steps, schedule="linear")
            batch = make_batch("classify", train_ids, train_labels, indices, tokenizer.pad_id, device)
            step(model, optimizer, batch, lr)
            done += 1
        # Evaluation on the test split, in batches of 64, dropout off.
        scores = evaluate(model, "classify", test_ids, test_labels, 64, tokenizer.pad_id, device, len(names))
        print(f"epoch {epoch + 1}: test loss {scores['loss']:.4f}, accuracy {scores['accuracy']:.4f}")


if __name__ == "__main__":
    main()
