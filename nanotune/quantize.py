"""Swap linear layers for bitsandbytes 8-bit (LLM.int8) or 4-bit (NF4 / FP4) layers.

A quantized layer stores its weight in 8 or 4 bits and computes in a chosen dtype; the bias stays
as it is. Quantized weights cannot be trained directly: train LoRA adapters beside them (QLoRA).
The output head (`lm_head`, tied to GPT-2's embeddings) and a classifier stay in full precision.

`quantize_linears` is the swap in its textbook form: the model loaded in full precision, then each
target layer replaced by its quantized twin. Its fast twin, `tricks.quantize_while_loading`, swaps
each layer as soon as the checkpoint has filled it, so that a full-precision copy of the whole
model never exists (the `quantize_in_pieces` trick).
"""
import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import NanotuneError

BLOCK = 64     # 4-bit: weights per block, each block with its own scale (bitsandbytes' default)


@dataclass
class QuantConfig:
    mode: str = "4bit"                  # "8bit" or "4bit"
    quant_type: str = "nf4"             # 4-bit: "nf4" (normal float, for normally distributed weights) or "fp4"
    double_quant: bool = True           # 4-bit: quantize the per-block scales too (~0.4 bits a weight less)
    compute_dtype: torch.dtype = torch.float32   # 4-bit: dtype the matmul runs in
    skip: tuple = ("lm_head", "classifier")      # layer names kept in full precision
    # bitsandbytes' fast CPU inference kernel repacks a 4-bit weight on its first forward in eval
    # mode, for good: backward no longer works after that. Training (which evaluates between
    # epochs) must leave it off; generation may turn it on.
    cpu_inference_kernel: bool = False


def _bitsandbytes():
    # On import, bitsandbytes warns that an optional kernel downloader is missing and falls back
    # to its own CPU kernels: noise for nanotune's users, so that one logger is quietened.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8 casts its input to fp16 by design, and says so on every call.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    import bitsandbytes
    return bitsandbytes


def quantized_linear(linear: nn.Linear, q: QuantConfig, quantize_4bit=None):
    """A bitsandbytes layer holding `linear`'s weight, quantized, and its bias. `quantize_4bit`
    replaces bitsandbytes' own 4-bit quantizer (tricks.quantize_4bit_by_rows: the same bytes)."""
    bnb = _bitsandbytes()
    has_bias = linear.bias is not None
    if q.mode == "8bit":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data.contiguous(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=q.compute_dtype,
                                  compress_statistics=q.double_quant, quant_type=q.quant_type, device="meta")
        if quantize_4bit is not None:
            packed, state = quantize_4bit(linear.weight.data, q)
        else:
            packed, state = bnb.functional.quantize_4bit(linear.weight.data.contiguous(), blocksize=BLOCK,
                                                         compress_statistics=q.double_quant, quant_type=q.quant_type)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=BLOCK,
                                         bnb_quantized=True, compress_statistics=q.double_quant,
                                         quant_type=q.quant_type, module=layer)
        fits_kernel = linear.in_features % 64 == 0 and linear.out_features % 32 == 0   # its block layout
        layer.support_avx512bf16_for_cpu = layer.support_avx512bf16_for_cpu and q.cpu_inference_kernel and fits_kernel
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer.train(linear.training)             # in the mode of the layer it replaces (eval after loading)
    return layer.to(linear.weight.device)    # 8-bit: bitsandbytes quantizes the weight as it moves to its device


def dequantized_weight(linear) -> torch.Tensor:
    """The (out, in) weight of a plain or quantized linear layer, in full precision."""
    weight = linear.weight
    if type(linear).__name__ == "Linear4bit":
        return _bitsandbytes().functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(linear).__name__ == "Linear8bitLt":   # int8 rows scaled by each row's absmax / 127
        scales = weight.SCB if weight.SCB is not None else linear.state.SCB   # the first forward moves them to .state
        return weight.data.float() * scales.float()[:, None] / 127
    return weight.data


def targets(model, skip):
    """Names of the linear layers to quantize: not skipped by name, and not sharing their weight
    with an embedding (GPT-2's output layer is its token embedding, which stays as it is)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not set(name.split(".")) & set(skip) and id(m.weight) not in embeddings]


def check(model, q: QuantConfig):
    """The names of the layers to quantize, or an error if there are none."""
    if q.mode not in ("8bit", "4bit"):
        raise NanotuneError(f"--quantize {q.mode!r}: use 8bit or 4bit")
    names = targets(model, q.skip)
    if not names:
        raise NanotuneError(f"no linear layers to quantize in {type(model).__name__} once {', '.join(q.skip)} are"
                            " skipped: quantize fewer exceptions, or drop --quantize")
    return names


def quantize_linears(model, q: QuantConfig, names=None):
    """Replace every target linear layer (or those `names`) by its quantized twin: walk the
    layers, swap each one."""
    for name in names if names is not None else check(model, q):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, quantized_linear(getattr(owner, child), q))
    return model


def parameter_count(model) -> int:
    """Number of weights, counting a packed 4-bit tensor by the weights it holds, not its bytes."""
    return sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


def footprint_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers, quantization scales included (tensors
    still on the meta device, not loaded yet, hold nothing)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta:
            continue
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)                        # 4-bit: block scales
        while state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            state = getattr(state, "state2", None)                     # double quantization
        if getattr(t, "SCB", None) is not None:                        # 8-bit: row scales
            total += t.SCB.numel() * t.SCB.element_size()
    return total
