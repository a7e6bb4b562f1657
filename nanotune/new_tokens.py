"""New tokens: add them to the tokenizer as whole tokens, and grow the model's embedding to match
(`resize_token_embeddings`, written out)."""
import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import NanotuneError


def read_tokens(value) -> list:
    """--add-tokens: a file with one token a line, or tokens separated by commas."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            tokens = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise NanotuneError(f"--add-tokens {value} is not a UTF-8 text file: one token a line") from None
    else:
        tokens = [t.strip() for t in value.split(",") if t.strip()]
    if not tokens:
        raise NanotuneError(f"--add-tokens {value!r} names no tokens: give them separated by commas, or a"
                            " file with one a line")
    return list(dict.fromkeys(tokens))


def add_tokens(tokenizer, tokens) -> list:
    """Add tokens that the tokenizer matches whole, before BPE or WordPiece splits the text (and
    before BERT's lower-casing: `normalized=False`), so each is one id. Returns the ids of all of
    `tokens`; those already in the vocabulary keep theirs."""
    from tokenizers import AddedToken
    new = [t for t in tokens if tokenizer.tokenizer.token_to_id(t) is None]
    tokenizer.tokenizer.add_tokens([AddedToken(t, single_word=False, normalized=False, special=False) for t in new])
    return [tokenizer.tokenizer.token_to_id(t) for t in tokens]


def input_embedding(model):
    """(its name, the token embedding): GPT-2's `transformer.wte`, Llama's `model.embed_tokens`, BERT's
    `bert.embeddings.word_embeddings`."""
    for name in ("transformer.wte", "model.embed_tokens", "bert.embeddings.word_embeddings",
                 "embeddings.word_embeddings"):
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    raise NanotuneError(f"{type(model).__name__} has no token embedding to grow")


@torch.no_grad()
def resize_token_embeddings(model, size, multiple_of=None) -> int:
    """Grow the token embedding to `size` rows (rounded up to a multiple of `multiple_of`, which
    some matrix kernels run faster on); never shrink it. Returns the new number of rows.

    The new rows start as the mean of the existing ones. A random row would be far from every
    other: its first logits would be extreme, and the first steps of fine-tuning would be spent
    pulling it back. The mean is a token the model already finds unremarkable (Hewitt, 2021).
    A tied output layer (GPT-2's) is the same matrix, so it grows with it; an untied one (most Llama
    models) grows its own rows, the mean of its others, in the same way."""
    if multiple_of:
        size = math.ceil(size / multiple_of) * multiple_of
    _, embedding = input_embedding(model)
    old = embedding.weight
    if size <= old.shape[0]:
        return old.shape[0]
    head = getattr(model, "lm_head", None)
    tied = head is not None and head.weight is old
    embedding.weight = nn.Parameter(grown_by_mean(old, size), requires_grad=old.requires_grad)
    embedding.num_embeddings = size
    model.config.vocab_size = size
    if head is not None:
        head.out_features = size
        if tied:
            model.tie_weights()
        else:
            head.weight = nn.Parameter(grown_by_mean(head.weight, size), requires_grad=head.weight.requires_grad)
    return size


def grown_by_mean(weight, size):
    """`weight` with rows added up to `size`, each the mean of the existing rows."""
    grown = torch.empty(size, weight.shape[1], dtype=weight.dtype, device=weight.device)
    grown[:weight.shape[0]] = weight
    grown[weight.shape[0]:] = weight.float().mean(0).to(weight.dtype)
    return grown


def train_rows_only(embedding, rows):
    """Train only these rows of an otherwise frozen embedding (LoRA runs with new tokens): the
    gradient of every other row is zeroed, so AdamW leaves those rows exactly as they are (a zero
    gradient gives zero moments and a zero step; embeddings get no weight decay)."""
    embedding.weight.requires_grad_(True)
    mask = torch.zeros(embedding.weight.shape[0], 1, dtype=embedding.weight.dtype, device=embedding.weight.device)
    mask[list(rows)] = 1
    embedding.weight.register_hook(lambda grad: grad * mask)


def grow_tokenizer(tokenizer, spec):
    """--add-tokens, the tokenizer's half: new whole tokens, so that the data report and the
    batches already see them. Returns (the tokens asked for, their ids, the vocabulary's size before)."""
    wanted = read_tokens(spec) if spec else []
    before = tokenizer.vocab_size
    return wanted, add_tokens(tokenizer, wanted) if wanted else [], before


def grow_embedding(model, tokenizer, added, multiple_of=None, say=print) -> list:
    """--add-tokens and --pad-vocab-to-multiple-of, the model's half: as many new rows in the
    embedding as the tokenizer has new tokens (the transfer-learning step `resize_token_embeddings`).
    Returns the ids of the tokens added."""
    wanted, ids, before = added
    if not (wanted or multiple_of):
        return []
    new = [i for i in ids if i >= before]
    rows = resize_token_embeddings(model, max(tokenizer.vocab_size, model.config.vocab_size), multiple_of)
    if wanted:
        names = ", ".join(t for t, i in zip(wanted, ids) if i >= before) or "all were there"
        span = f"{min(new)}..{max(new)}" if new else "-..-"
        say(f"tokens: added {len(new)} of {len(wanted)} ({names}), ids {span}; the embedding has {rows:,} rows,"
            " new ones the mean of the others")
    return new
