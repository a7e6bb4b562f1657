"""Text generation with a key/value cache, and the sampling filters.

Each step feeds only the newest token through the model; the keys and values of all earlier
positions come from the cache, so a step costs one position, not the whole sequence again.
Several prompts run as one batch, padded on the left so that they all end at the same position.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

from .gpt2 import KVCache
from .tokenizer import pad


class PackedLinear(nn.Module):
    """An nn.Linear for decoding on CPU, with its weight packed once into the layout the matrix
    product works in. A plain product re-arranges the weight at every call, and when a decoding
    step multiplies it by a few rows only, that dominates.

    fp32 goes through MKL, packed for one row count: the 124M model's output layer takes 29 ms at
    8 rows with F.linear and 10 ms packed. Packing the whole model takes about half a second and
    doubles the memory its weights take while generating, so fp32 is only packed for batches of more
    than one sequence (at one row it saves ~1 ms a token); inputs with another number of rows (the
    prompt) use the plain weight. bf16 goes through oneDNN, whose packed weight serves any row count:
    packing takes ~0.15 s for 124M, and a one-row decoding step then takes a fifth to a quarter less
    time (28 vs 38 ms, 40 vs 50 ms a token in two A/B runs here)."""

    def __init__(self, linear, rows):
        super().__init__()
        self.weight, self.bias, self.rows = linear.weight, linear.bias, rows
        if linear.weight.dtype == torch.float32:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight)

    def forward(self, x):
        if self.weight.dtype == torch.float32:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packs(linear, rows):
    """Whether PackedLinear pays for this layer: a plain (not quantized, which are nn.Linear
    subclasses) CPU layer, fp32 with MKL for batches > 1, or bf16 where oneDNN supports it."""
    if type(linear) is not nn.Linear or linear.weight.device.type != "cpu":
        return False
    if linear.weight.dtype == torch.float32:
        return rows > 1 and torch.backends.mkl.is_available()
    return (linear.weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextmanager
def packed_linears(model, rows):
    """Swap the model's linear layers for PackedLinear ones while decoding `rows` sequences, where
    that pays (see `packs`), and put the originals back afterwards."""
    swapped = [(parent, name, child) for parent in list(model.modules())
               for name, child in parent.named_children() if packs(child, rows)]
    for parent, name, child in swapped:
        setattr(parent, name, PackedLinear(child, rows))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def repetition_penalty_(logits, seen, penalty):
    """Make tokens already in the text less likely (CTRL paper): divide a positive logit by
    `penalty`, multiply a negative one. `seen` (B, V) is True for tokens present so far."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits, k):
    """Keep the k highest logits of each row, set the rest to -inf."""
    if k is None or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]                  # (B, 1): the k-th largest
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus sampling: keep the smallest set of most likely tokens whose probabilities add up
    to at least p. The most likely token is always kept, whatever p is."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs                             # mass of the tokens ranked above
    remove_sorted = mass_before >= p                                       # rank 0 has mass_before 0: kept
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample(probs, generator=None):
    """One token per row, drawn with the row's probabilities: the first token whose cumulative
    probability exceeds a uniform random number (inverse transform sampling). torch.multinomial
    draws the same way but took 15 ms for 8 rows of 50,257 on CPU; this takes well under 1 ms."""
    cdf = probs.cumsum(dim=-1)                                                         # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def next_tokens(logits, temperature, top_k, top_p, generator):
    """Pick one token per row: greedy when temperature is 0, else sample from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    return sample(logits.float().softmax(dim=-1), generator)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, pad_id, eos_id=None, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, generator=None, on_token=None):
    """Continue each prompt (a list of token ids). Returns the new tokens of each, without the EOS.

    `on_token(i, new_ids)` is called after every new token of sequence i (to stream it, or to look
    for a stop string) and may return True to end that sequence. Generation also stops at EOS,
    after `max_new_tokens`, or when the model's context is full.
    """
    device = model.lm_head.weight.device
    B = len(prompts)
    input_ids, attention_mask = (t.to(device) for t in pad(prompts, pad_id, side="left"))   # (B, T)
    T = input_ids.shape[1]
    max_new_tokens = min(max_new_tokens, model.config.n_positions - T)
    cache = KVCache(model.config, B, T + max_new_tokens, device, model.lm_head.weight.dtype)
    padded = not bool(attention_mask.all())
    # With left padding a prompt starts at its first real token: count positions from there.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                               # (B, T)
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, input_ids, attention_mask.bool())
    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)

    with packed_linears(model, B):
        # The prompt in one forward pass fills the cache; only the last position's logits are needed.
        hidden = model.hidden_states(input_ids, attention_mask if padded else None, position_ids, cache)
        logits = model.lm_head(hidden[:, -1]).float()                                            # (B, V)
        for step in range(max_new_tokens):
            if repetition_penalty != 1.0:
                logits = repetition_penalty_(logits, seen, repetition_penalty)
            token = next_tokens(logits, temperature, top_k, top_p, generator)                     # (B,)
            token = token.masked_fill(done, pad_id)                            # finished rows idle on padding
            finished = done.tolist()
            for i, t in enumerate(token.tolist()):
                if finished[i]:
                    continue
                if t == eos_id:
                    finished[i] = True
                    continue
                new[i].append(t)
                if on_token is not None and on_token(i, new[i]):
                    finished[i] = True
            if all(finished) or step == max_new_tokens - 1:
                break
            done = torch.tensor(finished, device=device)
            if repetition_penalty != 1.0:
                seen[torch.arange(B, device=device), token] = True
            position_ids = position_ids[:, -1:] + 1                                                # (B, 1)
            if padded:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            hidden = model.hidden_states(token[:, None], attention_mask if padded else None, position_ids, cache)
            logits = model.lm_head(hidden[:, -1]).float()
    return new
