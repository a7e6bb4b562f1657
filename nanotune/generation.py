"""Text generation: the sampling filters, the plain loop, and its fast twin with a key/value cache.

Generation is a loop: run the model on the text so far, take the scores (logits) it gives at the
last position for the next token, turn them into a choice (the most likely token, or a draw from
the filtered softmax), append it, repeat. Several prompts run as one batch, padded on the left so
that they all end at the same position.
"""

import torch

from . import tricks
from .tokenizer import pad


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


def next_tokens(logits, temperature, top_k, top_p, generator):
    """Pick one token per row: greedy when temperature is 0, else sample from the filtered softmax.
    Temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = logits.float().softmax(dim=-1)                                  # (B, V)
    if tricks.enabled("fast_sampling"):
        return tricks.sample(probs, generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def record(tokens, new, finished, eos_id, on_token):
    """Append each unfinished row's new token; a row finishes at EOS (`eos_id`: one id, or several:
    a chat model also stops at its end-of-turn token) or when on_token says so."""
    stops = set(eos_id) if isinstance(eos_id, (set, frozenset, list, tuple)) else {eos_id}
    for i, t in enumerate(tokens.tolist()):
        if finished[i]:
            continue
        if t in stops:
            finished[i] = True
            continue
        new[i].append(t)
        if on_token is not None and on_token(i, new[i]):
            finished[i] = True


class KVCache:
    """Keys and values of every layer for the positions seen so far, so that decoding one more
    token costs one position instead of the whole sequence again. Allocated once, filled in place;
    (layers, key/value heads, head size) come from the model's cache_layout()."""

    def __init__(self, layers, heads, head_size, batch_size, max_len, device=None, dtype=None):
        shape = (layers, batch_size, heads, max_len, head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0        # positions filled; the model advances it after each forward

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, positions):
        """The model's forward has filled `positions` more (every layer): the next starts after them."""
        self.length += positions


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, pad_id, eos_id=None, temperature=1.0, top_k=None, top_p=None,
             repetition_penalty=1.0, generator=None, on_token=None, on_step=None):
    """Continue each prompt (a list of token ids). Returns the new tokens of each, without the EOS.

    `on_token(i, new_ids)` is called after every new token of sequence i (to stream it, or to look
    for a stop string) and may return True to end that sequence. Generation also stops at EOS,
    after `max_new_tokens`, or when the model's context is full. `on_step(logits, seen, tokens)`,
    if given, sees every step: the model's logits (B, V) before any filter, the tokens seen so far
    (B, V; None without a repetition penalty) and the tokens picked (B,)."""
    if tricks.enabled("kv_cache"):
        return generate_with_cache(model, prompts, max_new_tokens, pad_id, eos_id, temperature, top_k, top_p,
                                   repetition_penalty, generator, on_token, on_step)
    device = model.lm_head.weight.device
    ids, mask = (t.to(device) for t in pad(prompts, pad_id, side="left"))             # (B, T)
    new, finished = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(min(max_new_tokens, model.config.context - ids.shape[1])):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                  # left padding: count from the first real token
        logits = model(ids, mask, positions)[:, -1].float()            # the whole text again; scores for the next
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, mask.bool())
        token = next_tokens(repetition_penalty_(logits, seen, repetition_penalty) if seen is not None else logits,
                            temperature, top_k, top_p, generator)                  # (B,)
        if on_step is not None:
            on_step(logits, seen, token)
        record(token, new, finished, eos_id, on_token)
        if all(finished):
            break
        ids = torch.cat([ids, token.masked_fill(torch.tensor(finished, device=device), pad_id)[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return new


def generate_with_cache(model, prompts, max_new_tokens, pad_id, eos_id=None, temperature=1.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, generator=None, on_token=None, on_step=None):
    """`generate`, with a key/value cache (the `kv_cache` trick, see nanotune/tricks.py).

    The keys and values of the positions already seen do not change when a token is appended (a
    position only looks back), so they are kept (KVCache, above) and each step feeds only the newest
    token through the model: a step costs one position instead of the whole text. The same logits,
    up to rounding. A Llama's blocks compute their q, k, v and gate, up projections as two products
    (tricks.fused_blocks). On CPU, linear layers are also packed once for the decoding steps (bf16, or fp32
    when several sequences decode together), and a quantized model's layers use faster kernels
    (tricks.packed_linears)."""
    device = model.lm_head.weight.device
    B = len(prompts)
    input_ids, attention_mask = (t.to(device) for t in pad(prompts, pad_id, side="left"))   # (B, T)
    T = input_ids.shape[1]
    max_new_tokens = min(max_new_tokens, model.config.context - T)
    cache = KVCache(*model.cache_layout(), B, T + max_new_tokens, device, model.lm_head.weight.dtype)
    padded = not bool(attention_mask.all())
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)                               # (B, T)
    seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, input_ids, attention_mask.bool())
    new, finished = [[] for _ in range(B)], [False] * B
    with torch.inference_mode(), tricks.fused_blocks(model), tricks.packed_linears(model, B):
        # The prompt in one forward pass fills the cache; only the last position's logits are needed.
        hidden = model.hidden_states(input_ids, attention_mask if padded else None, position_ids, cache)
        logits = model.lm_head(hidden[:, -1]).float()                                            # (B, V)
        for step in range(max_new_tokens):
            penalised = repetition_penalty_(logits, seen, repetition_penalty) if repetition_penalty != 1.0 else logits
            token = next_tokens(penalised, temperature, top_k, top_p, generator)                  # (B,)
            if on_step is not None:
                on_step(logits, seen if repetition_penalty != 1.0 else None, token)
            token = token.masked_fill(torch.tensor(finished, device=device), pad_id)  # finished rows idle on padding
            record(token, new, finished, eos_id, on_token)
            if all(finished) or step == max_new_tokens - 1:
                break
            if repetition_penalty != 1.0:
                seen[torch.arange(B, device=device), token] = True
            position_ids = position_ids[:, -1:] + 1                                                # (B, 1)
            if padded:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            hidden = model.hidden_states(token[:, None], attention_mask if padded else None, position_ids, cache)
            logits = model.lm_head(hidden[:, -1]).float()
    return new
