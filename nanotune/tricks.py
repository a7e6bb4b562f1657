"""The speed tricks: every place where nanotune computes what the textbook code computes, only
faster or in less memory, gathered in one module.

A reader meets the plain version of each step first, in the model, loss and generation files;
it hands over to its fast twin here with one `if tricks.enabled(NAME):`. Each twin's docstring
says what it does and why it may: why the result is the same. tests/test_tricks.py binds every
twin to its plain version; `python bench/tricks.py` measures what each one buys, and
bench/README.md keeps the figures.

Each trick: its name, the plain version (where a reader meets it) -> the fast twin (here).

- dropout_mask: F.dropout (dropout.Dropout) -> dropout: a 1-byte mask from numpy's PCG64
- attention: attention() in gpt2.py and bert.py: scores, mask, softmax, dropout, times v ->
  causal_attention, attention: PyTorch's fused kernel; on CPU with dropout, scores in blocks of
  queries and DropoutThenMatmul
- chunked_loss: train.loss_sum: the full logits, then losses.causal_lm_loss_sum ->
  chunked_lm_loss_sum: the output layer and the loss a chunk of positions at a time
- kv_cache: generation.generate: the whole sequence through the model for every new token ->
  generation.generate_with_cache
- packed_weights: nn.Linear while decoding (bf16; fp32 at batches > 1; the fp32 output layer) ->
  PackedLinear: weights packed once for the CPU's matrix product; TransposedLinear
- quantized_decoding: bitsandbytes' layers and the fp32 output layer while decoding a quantized
  model -> Int8Linear: PyTorch's int8 weight-only kernel; Bf16Linear for 4-bit layers without
  bitsandbytes' fast kernel; the output layer read in bf16
- fused_decoding: llama.Block while generating (q, k, v and gate, up: five products, each read
  from its own weight) -> FusedBlock: one q|k|v product and one gate|up product a layer
- fast_sampling: torch.multinomial -> sample: inverse transform sampling
- few_shapes: data.make_batch: each batch padded to its longest example -> padded_to_multiple: and on
  to a multiple of 8 positions
- fused_adamw: optim.make_optimizer: torch.optim.AdamW, one parameter at a time -> fused_adamw:
  PyTorch's fused kernel, every parameter's update in one pass over its bytes
- clip_in_adamw: train.clip_and_step: clip_grad_norm_ scales the gradients, then AdamW reads them ->
  clip_inside_adamw: the norm measured, the scale handed to AdamW's fused pass
- keep_freed_memory: the C library's malloc as it is -> keep_freed_memory: each step reuses the
  last step's memory
- quantize_in_pieces: train.load_pretrained: the whole model loaded, then quantize.quantize_linears
  swaps each layer -> quantize_while_loading: each layer swapped as it loads, 4-bit weights a slice
  at a time
- background_saving: run/checkpoint.Saver.save: the model and the training state written while
  training waits -> Saver._save_in_background: copied, then written by a thread while the next
  epoch trains, where a processor is free for the writer (the one twin outside this module: it is
  the run's machinery, not the book's)
- mapped_checkpoint: hub.iter_checkpoint: safetensors.torch.load_file, every tensor copied into
  memory -> mapped_tensors: views of the memory-mapped file, its pages handed back once taken
- transposed_views: gpt2.GPT2.from_hub: each Conv1D weight copied into nn.Linear's (out, in) order ->
  a transposed view of the checkpoint's bytes; own_memory gives the weights an optimizer steps
  memory of their own

`python train.py --plain` and `python generate.py --plain` turn every trick off (`--plain
attention,chunked_loss` only those); from Python, `with nanotune.plain(): ...`.
"""
import ctypes
import math
import mmap
import sys
import weakref
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantize import BLOCK, _bitsandbytes, check, dequantized_weight, quantized_linear

NAMES = ("few_shapes", "dropout_mask", "attention", "chunked_loss", "kv_cache", "packed_weights", "quantized_decoding",
         "fused_decoding", "fast_sampling", "fused_adamw", "clip_in_adamw", "keep_freed_memory", "quantize_in_pieces",
         "background_saving", "mapped_checkpoint", "transposed_views")
_off = set()            # the tricks turned off in this process


def enabled(name) -> bool:
    return name not in _off


def _checked(names):
    names = NAMES if names is None else tuple(names)
    unknown = set(names) - set(NAMES)
    if unknown:
        raise ValueError(f"no trick named {', '.join(sorted(unknown))}; the tricks are {', '.join(NAMES)}")
    return names


def turn_off(names=None):
    """Turn tricks off for the rest of the process (all of them by default): what `--plain` does."""
    _off.update(_checked(names))


@contextmanager
def plain(names=None):
    """Inside the block, the textbook version of every step runs (or of the tricks named)."""
    before = set(_off)
    turn_off(names)
    try:
        yield
    finally:
        _off.clear()
        _off.update(before)


# ---- dropout_mask ------------------------------------------------------------------------------

LEVELS = 65536     # 16-bit uniform numbers


def keep_mask(shape, p, device):
    """1 (keep) with probability 1 - p, else 0, as uint8; and the scale 1 / (1 - p) for what is kept.

    Why it is faster: PyTorch's CPU dropout draws a float32 mask with `bernoulli_`, one number at a
    time from its Mersenne Twister, and keeps that 4-byte mask for backward. numpy's PCG64 makes the
    random bits in bulk, each 16 bits compared with p's threshold, and the kept mask is 1 byte.
    Why it is the same: each element is kept with probability 1 - p', where p is rounded to a
    multiple of 1/65,536 (0.1 becomes 0.100006), and kept values are scaled by exactly 1 / (1 - p'),
    so the expected activation is unchanged. PCG64 is seeded by one draw from torch's generator, so
    `torch.manual_seed`, gradient checkpointing's recompute and a resumed run see the same masks.
    uint8 rather than bool: a float tensor times a uint8 one runs a vectorized kernel; a bool
    operand (or masked_fill) takes a slower path."""
    n = math.prod(shape)
    drop_levels = round(p * LEVELS)
    seed = torch.randint(2**63 - 1, (), dtype=torch.int64).item()     # torch's generator decides
    bits = np.random.PCG64(seed).random_raw((n + 3) // 4)               # 64 random bits each
    keep = bits.view(np.int16)[:n] >= drop_levels - LEVELS // 2         # uniform over [-32768, 32767]
    return torch.from_numpy(keep.view(np.uint8)).view(shape).to(device), LEVELS / (LEVELS - drop_levels)


def dropout(x, p):
    """F.dropout(x, p) in training, on CPU, with the mask above. (On GPUs PyTorch's fused kernel
    already keeps a 1-byte mask, and p near 1 would lose precision to the 16-bit levels.)"""
    if x.device.type != "cpu" or p > 0.99:
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return (x * keep).mul_(scale)             # the product keeps only the 1-byte mask for backward


class DropoutThenMatmul(torch.autograd.Function):
    """dropout(probs) @ v, for attention on CPU. Backward needs the dropped probabilities; rather
    than keep them (another (B, nh, T, T) float tensor per layer), it keeps the probabilities,
    which softmax keeps for its own backward anyway, and the 1-byte mask, and drops again. The
    scale 1 / (1 - p) multiplies the (B, nh, T, hs) products, not the (B, nh, T, T) weights: the
    same numbers, since scaling commutes with the product."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, probs, v, p):
        keep, ctx.scale = keep_mask(probs.shape, p, probs.device)      # (B, nh, T, T)
        ctx.save_for_backward(probs, keep, v)
        return ((probs * keep) @ v).mul_(ctx.scale)                     # (B, nh, T, hs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_y):
        probs, keep, v = ctx.saved_tensors
        grad_y = grad_y * ctx.scale                                       # (B, nh, T, hs)
        grad_probs = (grad_y @ v.transpose(-2, -1)).mul_(keep)
        grad_v = (probs * keep).transpose(-2, -1) @ grad_y
        return grad_probs, grad_v, None


# ---- attention ---------------------------------------------------------------------------------

def causal_mask(T, S, device):
    """(T, S): query i (the last T of S positions) may look at key j when j <= i."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def causal_attention(q, k, v, mask, dropout_p):
    """gpt2.attention in fused kernels: the same softmax(q k^T / sqrt(hs), masked) v. With fewer key/value
    heads than query heads (llama.attention), the kernel reads each key/value head for its group of
    query heads (`enable_gqa`) instead of a repeated copy.

    PyTorch's scaled_dot_product_attention never materialises the (T, T) weights when it can
    avoid it, and with no padding it applies the causal mask itself (`is_causal`), or none at all
    for one new token that may see everything cached. Its CPU kernels cannot drop attention
    weights, though, and its fallback for dropout keeps two float copies of the weights for
    backward; training on CPU with dropout therefore takes `causal_attention_in_blocks`."""
    T, S, groups = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]     # groups > 1: grouped-query attention
    if dropout_p > 0 and q.device.type == "cpu":
        mask = causal_mask(T, S, q.device) if mask is None else mask
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)    # as llama.repeat_kv
        return causal_attention_in_blocks(q, k, v.contiguous(), mask, dropout_p)
    if mask is None and T not in (1, S):
        mask = causal_mask(T, S, q.device)
    causal = mask is None and T == S > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                          enable_gqa=groups > 1)


def causal_attention_in_blocks(q, k, v, mask, p, block=256):
    """softmax(q k^T / sqrt(hs), where mask allows) with dropout, times v, `block` queries at a time.

    The mask is causal, so the queries of one block never look at the keys after the block's last
    position: each block computes only its own share of the (T, T) scores (at 1,024 positions the
    blocks together compute 10/16 of them). Up to `block` positions this is one block. On the way:
    q is scaled by 1/sqrt(hs) before the product ((T, hs) numbers, not (T, T)); forbidden keys get
    an added -inf (an addition's backward is free, a masked_fill's is not), which softmax turns
    into the same zero weight; softmax runs in the scores' own dtype (under autocast, float32
    probabilities would only be cast back to bf16 for the product with v)."""
    T, past = q.shape[2], k.shape[2] - q.shape[2]           # keys: `past` cached positions, then these T
    q = q * (1.0 / math.sqrt(k.size(-1)))
    forbidden = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    out = []
    for start in range(0, T, block):
        end = min(start + block, T)
        seen = past + end                                    # keys this block of queries may look at
        att = q[:, :, start:end] @ k[:, :, :seen].transpose(-2, -1) + forbidden[..., start:end, :seen]  # (B,nh,n,seen)
        att = att.softmax(dim=-1, dtype=att.dtype)
        out.append(DropoutThenMatmul.apply(att, v[:, :, :seen], p))                     # (B, nh, n, hs)
    return torch.cat(out, dim=2) if len(out) > 1 else out[0]


def attention(q, k, v, mask, dropout_p):
    """bert.attention in PyTorch's fused kernel: the same softmax(q k^T / sqrt(hs), masked) v.
    Training on CPU with dropout takes `attention_with_dropout` (the fused CPU kernels cannot drop
    weights; see causal_attention)."""
    if dropout_p > 0 and q.device.type == "cpu":
        return attention_with_dropout(q, k, v.contiguous(), mask, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention_with_dropout(q, k, v, mask, p):
    """softmax(q k^T / sqrt(hs), where mask allows) with dropout, times v: what
    causal_attention_in_blocks does, for BERT, whose queries all see every real key (one block).
    Padding keys get an added -inf, broadcast from (B, 1, 1, T); the dropped weights are never
    kept, only their 1-byte mask (DropoutThenMatmul), where PyTorch's dropout keeps a float mask
    and the dropped weights both."""
    q = q * (1.0 / math.sqrt(k.size(-1)))
    att = q @ k.transpose(-2, -1)                                                     # (B, nh, T, T)
    if mask is not None:
        att = att + torch.zeros(mask.shape, dtype=att.dtype, device=att.device).masked_fill_(~mask, float("-inf"))
    return DropoutThenMatmul.apply(att.softmax(dim=-1, dtype=att.dtype), v, p)          # (B, nh, T, hs)


# ---- chunked_loss ------------------------------------------------------------------------------

class _OutputLayerCrossEntropy(torch.autograd.Function):
    """sum over rows of cross-entropy(hidden @ weight.T, labels), computed a chunk of rows at a
    time, with the gradients worked out on the way (d loss / d logits = softmax - one-hot), so the
    full (rows, vocab) logits and their gradient never exist at once. The matrix products run in
    `dtype` (bf16 under autocast), softmax and the sum in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk, dtype):
        # Cast once here, not once per chunk and product as autocast would (the weight is 50,257 x C).
        hidden_lp, weight_lp = hidden.to(dtype), weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden_lp)
        grad_weight = None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden_lp[start:start + chunk], labels[start:start + chunk]
            logits = (h @ weight_lp.t()).float()                         # (n, V)
            scored = (y != -100)
            y = y.clamp(min=0)
            target = logits.gather(1, y[:, None])                        # (n, 1): logit of the true token
            top = logits.amax(dim=-1, keepdim=True)                      # (n, 1): so that exp cannot overflow
            grad = logits.sub_(top).exp_()                               # in place of the logits
            norm = grad.sum(dim=-1, keepdim=True)                        # (n, 1)
            # cross-entropy = logsumexp(logits) - logit of the true token
            total += ((top + norm.log() - target).squeeze(1) * scored).sum()
            grad.div_(norm)                                              # softmax
            grad[torch.arange(len(y), device=y.device), y] -= 1.0        # minus the one-hot target
            grad = grad.mul_(scored[:, None]).to(dtype)                  # ignored rows add nothing
            grad_hidden[start:start + chunk] = grad @ weight_lp
            if weight.requires_grad:
                if grad_weight is None:
                    grad_weight = (grad.t() @ h).to(weight.dtype)        # (V, C)
                elif dtype == weight.dtype:
                    grad_weight.addmm_(grad.t(), h)                      # in place: no (V, C) temporary
                else:   # a slice at a time: no (V, C) fp32 temporary for the cast
                    for acc, part in zip(grad_weight.split(4096), (grad.t() @ h).split(4096)):
                        acc += part
            del logits, grad           # freed before the next chunk's logits: one chunk alive, not two
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: no second (V, C) tensor. (Autograd counts versions, so a second backward
        # through this graph would raise instead of reusing the scaled values.)
        if grad_weight is not None:
            grad_weight.mul_(grad_total)
        return grad_hidden.mul_(grad_total), grad_weight, None, None, None


def chunks_the_loss(model):
    """Whether the chunked loss can serve this model: a language model whose output layer is a
    plain weight this process holds (FSDP keeps it sharded across ranks; DDP wraps the model)."""
    inner = getattr(model, "module", model)
    head = getattr(inner, "lm_head", None)
    return type(head) is nn.Linear and not hasattr(head.weight, "full_tensor")      # a DTensor shard has full_tensor


def chunked_lm_loss_sum(model, batch):
    """train.loss_sum for a language model: the model's hidden states, then the output layer and
    the loss together, a chunk of positions at a time (output_layer_lm_loss_sum)."""
    inner = getattr(model, "module", model)
    hidden = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"), output_layer=False)
    return output_layer_lm_loss_sum(hidden, inner.lm_head.weight, batch["labels"])[0]


def output_layer_lm_loss_sum(hidden, weight, labels, chunk=512):
    """losses.causal_lm_loss_sum(hidden @ weight.T, labels) without ever holding all the logits.

    GPT-2's output layer maps each position to 50,257 scores; the logits of a batch, their fp32
    copy, the log-softmax and its gradient are each as large as the rest of the step's activations.
    Here they exist for `chunk` positions at a time. The same sum and the same gradients: each
    row's cross-entropy depends on its own logits only, and d loss / d logits is softmax minus the
    one-hot target, which is what autograd computes through the plain version."""
    from .losses import next_token_labels
    labels = next_token_labels(labels)                                   # (B, T): the token that came next
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    rows = hidden.reshape(-1, hidden.shape[-1])                          # (B * T, C)
    total = _OutputLayerCrossEntropy.apply(rows, weight, labels.reshape(-1), chunk, dtype)
    return total, (labels != -100).sum()


# ---- packed_weights ------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """An nn.Linear for decoding on CPU, with its weight packed once (by oneDNN) into the layout
    the matrix product works in. A plain product re-arranges the weight at every call, and when a
    decoding step multiplies it by a few rows only, that re-arranging is most of the cost. The same
    product, summed in the kernel's own order: equal up to rounding. The packed weight serves any
    number of rows. bf16 layers are packed at any batch; fp32 ones when several sequences decode
    together (packs(), below: a packed copy doubles the memory the weights take, which pays at
    several rows, where MKL's plain fp32 product is slowest). With `dtype=torch.bfloat16` an fp32
    layer is packed as a bf16 copy (quantized_decoding, below); its inputs are cast to bf16 and its
    outputs back."""

    def __init__(self, linear, dtype=None):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.dtype = dtype or linear.weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(self.dtype))

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, bias, "none", [], "").to(x.dtype)


class TransposedLinear(nn.Module):
    """An fp32 output layer for decoding on CPU, its weight kept transposed: (in, out), contiguous.
    With one row to multiply, MKL reads a weight laid out (in, out) about twice as fast as
    nn.Linear's (out, in) here (GPT-2's 50,257 x 768 output layer: 6 vs 13 ms a token), and at
    eight rows as fast. The same products, summed in another order: equal up to fp32 rounding.
    The copy is made once and kept on the layer until its weight changes."""

    def __init__(self, linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        key = (linear.weight.data_ptr(), linear.weight._version)
        if getattr(linear, "_transposed", (None, None))[0] != key:
            linear._transposed = (key, linear.weight.detach().t().contiguous())
        self.transposed = linear._transposed[1]

    def forward(self, x):
        y = x @ self.transposed
        return y if self.bias is None else y + self.bias


def packs(linear, rows=1):
    """Whether PackedLinear serves this layer when `rows` sequences decode together: a plain (not
    quantized, which are nn.Linear subclasses) CPU layer, in bf16 where oneDNN supports bf16, in
    fp32 for more than one row."""
    if type(linear) is not nn.Linear or linear.weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    dtype = linear.weight.dtype
    return (dtype == torch.bfloat16 and _bf16_packing()) or (dtype == torch.float32 and rows > 1)


def transposes(linear):
    """Whether TransposedLinear serves this output layer (when PackedLinear does not): a plain fp32 CPU layer."""
    return type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32


def _bf16_packing():
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# ---- quantized_decoding ----------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """A bitsandbytes LLM.int8 layer (Linear8bitLt) for decoding on CPU, through PyTorch's own
    int8 weight-only kernel. LLM.int8 stores each weight row as int8 with one scale per row
    (the row's largest magnitude over 127): exactly the layout `_weight_int8pack_mm` takes, so the
    weight is used as stored, nothing is copied. The kernel multiplies bf16 activations by the
    dequantized weight, row scale by row scale: the layer's own product, x times the weight it
    stores, without bitsandbytes' further rounding of the activations to int8 (and fed bf16,
    its fast input type). Decoding reads the weights once a token, so reading 1 byte a weight
    instead of 4 is what makes a step faster."""

    def __init__(self, layer):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        row_absmax = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB   # a forward moves it
        self.scales = (row_absmax.float() / 127).to(torch.bfloat16)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight.data, self.scales).view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def int8_decodes(layer):
    return type(layer).__name__ == "Linear8bitLt" and layer.weight.device.type == "cpu"


class Bf16Linear(nn.Module):
    """A layer for decoding on CPU through a bf16 copy of its weight, made once: a 4-bit layer
    where bitsandbytes' fast CPU kernel is missing (it needs AVX512-BF16; without it, every product
    dequantizes the whole 4-bit weight to fp32 first), and a quantized model's output layer where
    oneDNN cannot pack bf16. The copy holds the weight the layer stores, rounded to bf16's 8-bit
    mantissa (finer than 4-bit levels). One row (a decoding step) goes through PyTorch's bf16
    matrix-vector product, which reads 2 bytes a weight and converts in registers, so it is fast
    even on CPUs without bf16 arithmetic; several rows (the prompt) through an fp32 product, since
    bf16 matrix products are emulated, and slow, on such CPUs. Used for one sequence only
    (packed_linears): at several rows every step would convert the copy."""

    def __init__(self, layer):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.copy = dequantized_weight(layer).to(torch.bfloat16)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 1:
            y = F.linear(rows.to(torch.bfloat16), self.copy).to(x.dtype)
        else:
            y = F.linear(rows, self.copy.to(x.dtype))
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def dequantizes_4bit_once(layer):
    return (type(layer).__name__ == "Linear4bit" and layer.weight.device.type == "cpu"
            and not getattr(layer, "support_avx512bf16_for_cpu", False))


def reads_output_layer_in_bf16(model, rows=1):
    """A quantized model's output layer (GPT-2's is its fp32 embedding, 50,257 x 768, kept in full
    precision) is the largest weight a decoding step reads: more bytes than all its 4-bit layers
    together. Decoding reads a bf16 copy of it instead (packed where oneDNN packs bf16, else a
    Bf16Linear for one row): half the bytes, and rounding well below what quantizing the other
    layers already changed."""
    quantized = any(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in model.modules())
    head = getattr(model, "lm_head", None)
    return (quantized and type(head) is nn.Linear and head.weight.device.type == "cpu"
            and head.weight.dtype == torch.float32 and (_bf16_packing() or rows == 1))


@contextmanager
def packed_linears(model, rows=1):
    """While decoding `rows` sequences: for a quantized model, swap its LLM.int8 layers for
    Int8Linear ones, for one sequence its 4-bit layers without bitsandbytes' fast kernel for
    Bf16Linear ones, and its output layer for a bf16 copy (quantized_decoding); swap the other
    linear layers for PackedLinear ones where packs() says so, else an fp32 output layer for a
    TransposedLinear (packed_weights). The originals are put back afterwards."""
    def fast_twin(parent, name, child):
        is_head = parent is model and name == "lm_head"
        if enabled("quantized_decoding") and int8_decodes(child):
            return Int8Linear(child)
        if enabled("quantized_decoding") and rows == 1 and dequantizes_4bit_once(child):
            return Bf16Linear(child)
        if is_head and enabled("quantized_decoding") and reads_output_layer_in_bf16(model, rows):
            return PackedLinear(child, torch.bfloat16) if _bf16_packing() else Bf16Linear(child)
        if enabled("packed_weights") and packs(child, rows):
            return PackedLinear(child)
        if is_head and enabled("packed_weights") and transposes(child):
            return TransposedLinear(child)
        return None
    swapped = [(parent, name, child, twin)
               for parent in list(model.modules()) for name, child in parent.named_children()
               if (twin := fast_twin(parent, name, child)) is not None]
    for parent, name, child, twin in swapped:
        setattr(parent, name, twin)
    try:
        yield
    finally:
        for parent, name, child, _ in swapped:
            setattr(parent, name, child)


# ---- fused_decoding ------------------------------------------------------------------------------

class FusedBlock(nn.Module):
    """A Llama block (llama.Block) for generating, with its query, key and value projections made
    one product, and its gate and up projections another. The three (and the two) read the same
    normalized input, so stacking their weights row-wise, (q | k | v) and (gate | up), gives one
    output whose column slices are the separate outputs: the same numbers, from two larger products
    instead of five small ones. A decoding step multiplies one row by each weight, so each product
    is short and its fixed cost (the call, the threads woken) is a large part of it: 30 layers of
    SmolLM2 make 150 such products a token, fused 60. The stacked weights are copies, made when
    generation starts and dropped when it ends (fused_blocks)."""

    def __init__(self, block):
        super().__init__()
        from .llama import apply_rope, attention          # llama.py imports this module: imported late
        self.rope, self.attention = apply_rope, attention
        attn, mlp = block.self_attn, block.mlp
        self.input_layernorm, self.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        self.n_head, self.n_kv, self.head_dim = attn.n_head, attn.n_kv, attn.head_dim
        self.qkv = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj, self.down_proj = attn.o_proj, mlp.down_proj
        self.gate_up = _stacked(mlp.gate_proj, mlp.up_proj)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv, self.head_dim
        q, k, v = self.qkv(self.input_layernorm(x)).split((nh * hs, nkv * hs, nkv * hs), dim=-1)
        q = self.rope(q.view(B, T, nh, hs).transpose(1, 2), cos, sin)                   # (B, nh, T, hs)
        k = self.rope(k.view(B, T, nkv, hs).transpose(1, 2), cos, sin)                  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = self.attention(q, k, v, mask, 0.0)                                          # (B, nh, T, hs)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, nh * hs))
        gate, up = self.gate_up(self.post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


def _stacked(*linears):
    """One nn.Linear whose weight is the layers' weights one under the other (and biases likewise)."""
    first = linears[0]
    weight = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=first.bias is not None, device="meta")
    out.weight = nn.Parameter(weight, requires_grad=False)
    if first.bias is not None:
        out.bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    return out


def fuses(block):
    """Whether FusedBlock computes what this block computes: a Llama block with exactly the plain
    parts FusedBlock knows (no q/k norms, no other norms, no LoRA or quantized layers), not training.
    Anything else (a family with more parts in its blocks) keeps its own forward."""
    parts = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    if type(block).__name__ != "Block" or {n for n, _ in block.named_children()} != parts or block.training:
        return False
    attn, mlp = block.self_attn, block.mlp
    linears = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
    if {n for n, _ in attn.named_children()} != linears[0] or {n for n, _ in mlp.named_children()} != linears[1]:
        return False
    if type(block.input_layernorm).__name__ != "RMSNorm" or type(block.post_attention_layernorm).__name__ != "RMSNorm":
        return False
    stacked = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
    return all(type(m) is nn.Linear and (m.bias is None) == (group[0].bias is None)
               and m.weight.dtype == group[0].weight.dtype for group in stacked for m in group)


@contextmanager
def fused_blocks(model):
    """While generating: each Llama block that fuses() swapped for a FusedBlock; put back afterwards."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    swapped = []
    if enabled("fused_decoding") and isinstance(layers, nn.ModuleList) and type(model).__name__ == "Llama":
        swapped = [(i, block) for i, block in enumerate(layers) if fuses(block)]
    for i, block in swapped:
        layers[i] = FusedBlock(block)
    try:
        yield
    finally:
        for i, block in swapped:
            layers[i] = block


# ---- fast_sampling -------------------------------------------------------------------------------

def sample(probs, generator=None):
    """torch.multinomial(probs, 1), drawn differently: the first token whose cumulative probability
    exceeds a uniform random number (inverse transform sampling). Each token comes with its own
    probability, as from torch.multinomial, but from one cumulative sum and a binary search per row
    instead of multinomial's slower CPU path. (The same seed gives other tokens than multinomial's.)"""
    cdf = probs.cumsum(dim=-1)                                                         # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


# ---- few_shapes ------------------------------------------------------------------------------------

MULTIPLE = 8


def padded_width(width, limit, multiple=MULTIPLE):
    """`width` rounded up to a multiple of 8, never past `limit` (the model's context)."""
    return max(width, min(-(-width // multiple) * multiple, limit))


def padded_to_multiple(batch, pad_id, limit):
    """The batch with padding columns added up to a multiple of 8 positions (never past `limit`,
    the model's context): what transformers' collators do with `pad_to_multiple_of=8`.

    Padded to its longest example, a batch of short texts has a new width nearly every step, and
    each width asks the allocator for blocks of new sizes: the heap that keep_freed_memory keeps
    splits into pieces that fit no later request and grows (the main command on GPT-2 124M peaked
    929 MiB higher without this trick: bench/README.md), and the matrix-product kernels meet a new
    shape each time. With widths in steps of 8 there are a handful of shapes, reused from step to
    step. Why it may: the added columns are padding like any other, masked out of attention
    (attention mask 0) and out of the loss (label -100), so the loss and gradients are the plain
    batch's up to rounding (tests/test_tricks.py)."""
    width = batch["input_ids"].shape[1]
    extra = padded_width(width, limit) - width
    if extra == 0:
        return batch
    mask = batch["attention_mask"] if batch["attention_mask"] is not None else torch.ones_like(batch["input_ids"])
    widened = lambda t, value: torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)
    wider = dict(batch, input_ids=widened(batch["input_ids"], pad_id), attention_mask=widened(mask, 0))
    if batch["labels"].dim() == 2:                              # a language model's per-token labels
        wider["labels"] = widened(batch["labels"], -100)
    if batch.get("position_ids") is not None:
        wider["position_ids"] = widened(batch["position_ids"], 0)
    return wider


# ---- fused_adamw ---------------------------------------------------------------------------------

def fuses_adamw(groups) -> bool:
    """Whether fused_adamw can serve: PyTorch has the fused kernel for CPU and CUDA tensors, and
    for plain ones only (not FSDP's sharded DTensors)."""
    params = [p for g in groups for p in g["params"]]
    return {p.device.type for p in params} <= {"cpu", "cuda"} and all(
        p.is_floating_point() and type(p.data) is torch.Tensor for p in params)


def fused_adamw(groups, **settings):
    """torch.optim.AdamW(groups, **settings) with `fused=True`: the same update, computed for all
    parameters by one kernel that reads each weight, gradient and moment once and writes the
    weight and moments once. Plain AdamW on a CPU steps one parameter at a time through about ten
    separate tensor operations (each a pass over memory: the moments' decay, their sums, the
    square root, the division), so it moves several times the bytes. The arithmetic is AdamW's, in
    fp32, in the same order up to rounding (tests/test_optim.py). It is also the optimizer that
    clip_inside_adamw can hand its clipping factor to."""
    return torch.optim.AdamW(groups, fused=True, **settings)


# ---- clip_in_adamw -------------------------------------------------------------------------------

def clips_inside_adamw(optimizer) -> bool:
    """Whether clip_inside_adamw can serve: PyTorch's fused AdamW (optim.make_optimizer's choice on
    CPU and CUDA for plain tensors; not FSDP's sharded ones, whose norm needs every rank) over fp32
    weights (its kernel takes the scale in fp32 only; QLoRA's adapters may be bf16)."""
    return bool(optimizer.defaults.get("fused")) and all(
        p.dtype == torch.float32 for group in optimizer.param_groups for p in group["params"])


def clip_inside_adamw(optimizer, params, max_norm):
    """clip_grad_norm_(params, max_norm), then optimizer.step(), with one pass fewer over the
    gradients. Returns the gradient's norm before clipping, as clip_grad_norm_ does.

    clip_grad_norm_ reads every gradient to measure their norm, then multiplies every gradient by
    max_norm / (norm + 1e-6) when that is below 1: a second read and a write of all of them, which
    for a 124M model at short sequences costs as much as a tenth of the step. PyTorch's fused AdamW
    already reads each gradient once and can divide it by a scale on the way (`grad_scale`, the
    hook mixed-precision training uses to unscale fp16 gradients). Handing it the inverse factor
    gives AdamW the same clipped gradient: equal up to the rounding of one division instead of one
    multiplication (tests/test_tricks.py)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # clip_grad_norm_'s norm
    optimizer.grad_scale = 1 / torch.clamp(max_norm / (norm + 1e-6), max=1.0)               # and 1 / its factor
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm


# ---- keep_freed_memory ---------------------------------------------------------------------------

def keep_freed_memory():
    """Ask glibc's malloc to keep the memory PyTorch frees, for the next step to reuse (Linux, CPU).

    By default each block over about 32 MiB (and, until the threshold adapts, over 128 KiB) is an
    mmap of its own, handed back to the kernel when freed; every training step's fresh activations
    and gradients then arrive as new pages that the kernel zeroes on first touch (a page fault per
    4 KiB). The same cure as running PyTorch on CPU with jemalloc or tcmalloc, with the C library
    already loaded. Nothing computed changes; the price is that the process keeps its peak memory."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)     # glibc and musl have it
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)                  # every block from the heap, none its own mmap
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)    # and the heap's freed top is kept, not given back


# ---- quantize_in_pieces --------------------------------------------------------------------------

def quantize_while_loading(model, q):
    """quantize.quantize_linears, done while the checkpoint loads: for hub.load_weights, an
    `after_load` hook that swaps each target layer as soon as its weight (and bias) are in place,
    quantizing 4-bit weights a slice at a time and handing the freed memory back after each layer.
    The same quantized layers, so the same model; but the full-precision weights exist one layer at
    a time, not all at once (a 4-bit load peaks near the 4-bit size, not the fp32 one)."""
    waiting = {name: {"weight", "bias"} if model.get_submodule(name).bias is not None else {"weight"}
               for name in check(model, q)}

    def after_load(param_name):
        module_name, _, leaf = param_name.rpartition(".")
        if module_name in waiting:
            waiting[module_name].discard(leaf)
            if not waiting[module_name]:
                parent, _, child = module_name.rpartition(".")
                owner = model.get_submodule(parent)
                setattr(owner, child, quantized_linear(getattr(owner, child), q, quantize_4bit=quantize_4bit_by_rows))
                release_freed_memory()
    return after_load


def quantize_4bit_by_rows(weight, q, chunk_weights=2**16):
    """`bitsandbytes.functional.quantize_4bit(weight)`, some 65,000 weights at a time.

    bitsandbytes quantizes a whole matrix at once and makes several full-size float temporaries on
    the way, most of the peak memory of a 4-bit load. Each block of 64 consecutive weights is
    quantized on its own (one scale, its absmax), so row chunks whole blocks long give the same
    bytes. Double quantization then quantizes all the scales together, minus their mean, to 8 bits
    in blocks of 256, exactly as bitsandbytes does."""
    functional = _bitsandbytes().functional
    rows_per_block = BLOCK // math.gcd(weight.shape[1], BLOCK)         # rows that end on a block boundary
    rows = rows_per_block * max(1, chunk_weights // (weight.shape[1] * rows_per_block))
    packed, scales = [], []
    for start in range(0, weight.shape[0], rows):
        part, state = functional.quantize_4bit(weight[start:start + rows].contiguous(), blocksize=BLOCK,
                                               quant_type=q.quant_type)
        packed.append(part)
        scales.append(state.absmax)
    packed, scales = torch.cat(packed), torch.cat(scales)
    common = dict(shape=weight.shape, dtype=weight.dtype, blocksize=BLOCK, code=state.code, quant_type=q.quant_type)
    if not q.double_quant:
        return packed, functional.QuantState(absmax=scales, **common)
    offset = scales.mean()
    scales, scales_state = functional.quantize_blockwise(scales - offset, blocksize=256)
    return packed, functional.QuantState(absmax=scales, offset=offset, state2=scales_state, **common)


def release_freed_memory():
    """Hand the free memory back to the OS after each quantized layer (glibc; elsewhere nothing).
    Quantizing makes full-precision temporaries; glibc keeps freed blocks for reuse, but the small
    quantized tensors allocated between them leave holes no later layer fits, and the process would
    grow by the fp32 size of the model after all."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- mapped_checkpoint ---------------------------------------------------------------------------

# The checkpoint files mapped so far: (weak reference to the mmap, address of its first byte, size).
_MAPPINGS = []


def mapped_tensors(file, header_len, entries, size, dtypes):
    """safetensors.torch.load_file(file).items(), as views of the file's bytes (hub.iter_checkpoint).

    The file is memory-mapped copy-on-write and each tensor is a view of its bytes: nothing is
    copied, and pages are read from disk only when used. Once the caller has taken a tensor (kept
    the view, copied it, or quantized it), its pages are handed back to the OS (MADV_DONTNEED), so a
    checkpoint is never resident twice; a kept view simply re-reads them from the file on next use.
    Why it may: the same bytes, read in place rather than copied, so the same tensors
    (tests/test_tricks.py compares them). `header_len`, `entries`, `size`: the checked header."""
    with open(file, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    if data is not None:
        _MAPPINGS[:] = [m for m in _MAPPINGS if m[0]() is not None]
        _MAPPINGS.append((weakref.ref(data), torch.frombuffer(data, dtype=torch.uint8, count=1).data_ptr(), size))
    base = 8 + header_len
    for key, entry in entries.items():
        start, stop = entry["data_offsets"]
        dtype = dtypes[entry["dtype"]]
        count = (stop - start) // dtype.itemsize
        if count:
            tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=base + start)
        else:
            tensor = torch.empty(0, dtype=dtype)
        yield key, tensor.view(entry["shape"])
        # Page-aligned part of this tensor's bytes: no longer needed in memory.
        first, last = (base + start + mmap.PAGESIZE - 1) // mmap.PAGESIZE, (base + stop) // mmap.PAGESIZE
        if last > first and hasattr(mmap, "MADV_DONTNEED"):
            data.madvise(mmap.MADV_DONTNEED, first * mmap.PAGESIZE, (last - first) * mmap.PAGESIZE)


# ---- transposed_views ----------------------------------------------------------------------------

def own_memory(params) -> None:
    """The transposed_views trick's second half. GPT-2's four Conv1D weights are stored (in, out),
    the transpose of nn.Linear's (out, in); the plain load (gpt2.GPT2.from_hub) copies each into
    (out, in) order, the twin keeps a transposed view of the checkpoint's bytes (the matrix product
    reads either layout: the same numbers). Here each parameter that is such a view gets memory of
    its own in (out, in) order, and the file's pages are handed back.

    Done only for weights an optimizer will step: fused AdamW wants the weight, its gradient and
    its two moments contiguous, and would copy them there and back at every step. Frozen and
    inference-only weights stay views of the file, so loading costs no memory beyond what is used.
    One weight at a time, so the copy never holds more than one extra tensor. (After a plain load
    every weight is contiguous already, and nothing happens.)
    """
    for p in params:
        if p.is_contiguous():
            continue
        view = p.data
        p.data = view.contiguous()
        _release(view)


def _release(view) -> None:
    """MADV_DONTNEED the whole pages under `view` if it lies in a mapped checkpoint (not written to
    by anyone but this view: its bytes belong to one tensor). Memory outside the mappings is never
    touched: discarding it would zero it."""
    if view.dim() != 2 or not view.t().is_contiguous():
        return
    start = view.data_ptr()
    stop = start + view.numel() * view.element_size()
    for ref, base, size in _MAPPINGS:
        data = ref()
        if data is not None and base <= start and stop <= base + size and hasattr(mmap, "MADV_DONTNEED"):
            first, last = (start - base + mmap.PAGESIZE - 1) // mmap.PAGESIZE, (stop - base) // mmap.PAGESIZE
            if last > first:
                data.madvise(mmap.MADV_DONTNEED, first * mmap.PAGESIZE, (last - first) * mmap.PAGESIZE)
            return
