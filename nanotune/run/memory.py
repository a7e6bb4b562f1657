"""How much memory will the run need? An estimate made before anything big is loaded, broken
down the way a training step spends it, and checked against the measured peak at the end.

Weights, gradients and the optimizer's state are counted from config.json. What autograd keeps
for backward depends on every detail of the step (dropout masks, attention kernels, autocast's
copies, LoRA's extra products, bitsandbytes' own matmuls), so it is measured instead: a tiny model
of the same family, built with the same options, runs one forward pass at three batch shapes
while autograd's saved tensors (and the tensors functions hold on their autograd context) are
counted, and the per-block cost found (bytes per batch x length x width, per attention weight, and
a constant) is scaled to the real shapes.
"""
import importlib.util
import resource
import sys

import numpy as np
import torch

from .. import preference, tricks
from ..errors import NanotuneError
from ..optim import STATE_BYTES
from .checkpoint import saves_in_background

MiB = 2**20
ALLOCATOR_KEEPS = 0.25         # bytes malloc keeps per byte a training step makes and frees (CPU)
ADAPTER_PIECES = 2.5           # (batch x length x MLP width) tensors a LoRA block leaves in pieces (CPU)
RUN_ADDS = 60 * MiB            # what the run's kernels and buffers add after the estimate (CPU)


def rss_now():
    """Resident memory of this process now, in bytes (Linux; elsewhere the peak so far)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except OSError:
        return peak_rss()


def peak_rss():
    """The largest resident memory this process has had, in bytes. On Linux, VmHWM: getrusage's
    ru_maxrss carries over the peak of the process that started this one (fork keeps it and exec
    does not reset it), so a run started from a large process would report that one's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def available_memory():
    """Bytes the machine can still give this process (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


# ---- parameters, from config.json ---------------------------------------------------------------

def dims(config):
    """(width C, query heads, layers, MLP width) from any of the three families' config.json."""
    if config["model_type"] == "gpt2":
        C = config["n_embd"]
        return C, config["n_head"], config["n_layer"], config.get("n_inner") or 4 * C
    return (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"],
            config["intermediate_size"])


def linears(config):
    """(name, in, out) of one block's linear layers."""
    C, nh, _, inner = dims(config)
    if config["model_type"] == "gpt2":
        return [("c_attn", C, 3 * C), ("c_proj", C, C), ("c_fc", C, inner), ("c_proj", inner, C)]
    if config["model_type"] == "bert":
        return [("query", C, C), ("key", C, C), ("value", C, C), ("dense", C, C), ("dense", C, inner),
                ("dense", inner, C)]
    hs = config.get("head_dim") or C // nh
    kv = (config.get("num_key_value_heads") or nh) * hs
    return [("q_proj", C, nh * hs), ("k_proj", C, kv), ("v_proj", C, kv), ("o_proj", nh * hs, C),
            ("gate_proj", C, inner), ("up_proj", C, inner), ("down_proj", inner, C)]


def parameter_counts(config, labels=2):
    """{"blocks": weights of the blocks' linear layers, "other": every other parameter}."""
    if config["model_type"] == "gpt2":
        C, L = config["n_embd"], config["n_layer"]
        linear = sum(i * o + o for _, i, o in linears(config))
        return {"linear": L * sum(i * o for _, i, o in linears(config)),
                "other": L * (linear - sum(i * o for _, i, o in linears(config)) + 4 * C)
                + (config["vocab_size"] + config["n_positions"]) * C + 2 * C}
    H, L = config["hidden_size"], config["num_hidden_layers"]
    block_w = sum(i * o for _, i, o in linears(config))
    if config["model_type"] != "bert":                   # Llama: two RMSNorm gains a block, biases (Qwen2's q, k, v)
        biases = sum(o for name, _, o in linears(config)[:3]) if config["model_type"] == "qwen2" else 0
        output = 0 if config.get("tie_word_embeddings") else config["vocab_size"] * H
        return {"linear": L * block_w, "other": L * (2 * H + biases) + config["vocab_size"] * H + output + H}
    block_b = sum(o for _, i, o in linears(config)) + 4 * H
    rows = config["vocab_size"] + config["max_position_embeddings"] + config.get("type_vocab_size", 2)
    embeddings = rows * H + 2 * H
    return {"linear": L * block_w + H * H, "other": L * block_b + embeddings + H + H * labels + labels}


def quantized_bytes(weights, mode, double_quant):
    """Bytes of `weights` weights stored by bitsandbytes (an average over the layers' shapes)."""
    if mode == "8bit":
        return weights * 1.0 + weights / 768 * 4          # int8, and a float scale per row (rows of ~768 here)
    per_block = (1 + 4 / 256) if double_quant else 4    # 4-bit: a scale per 64 weights (8-bit if double-quantized)
    return weights * 0.5 + weights / 64 * per_block


def lora_count(config, r, targets):
    per_block = sum(r * (i + o) for name, i, o in linears(config) if name in targets)
    layers = config.get("n_layer") or config["num_hidden_layers"]
    pooler = r * 2 * config["hidden_size"] if config["model_type"] == "bert" and "dense" in targets else 0
    return layers * per_block + pooler


# ---- activations, measured on a tiny model of the same kind ---------------------------------------

def probe(config, quant, lora, bf16, labels=2):
    """Bytes autograd keeps for backward in one block, as a * (B T C) + c * (B nh T^2) + k, and the
    same for dropout masks and outside the blocks; measured on a model as wide as 16 per head."""
    from ..bert import BertClassifier, BertConfig
    from ..gpt2 import GPT2, GPT2Config
    from ..llama import Llama, LlamaConfig
    from ..lora import add_lora
    from ..quantize import quantize_linears
    kind, is_lm = config["model_type"], config["model_type"] != "bert"
    width, nh, _, inner = dims(config)
    C = 16 * nh
    I = max(1, round(inner / width * C))

    def build(layers):
        torch.manual_seed(0)
        if kind == "gpt2":
            names = ("activation_function", "embd_pdrop", "attn_pdrop", "resid_pdrop", "layer_norm_epsilon")
            keep = {k: config[k] for k in names if k in config}
            model = GPT2(GPT2Config(vocab_size=64, n_positions=256, n_embd=C, n_layer=layers, n_head=nh, n_inner=I,
                                    **keep))
        elif is_lm:
            names = ("attention_dropout", "attention_bias", "tie_word_embeddings")
            keep = {k: config[k] for k in names if k in config}
            kv_heads = config.get("num_key_value_heads") or nh
            model = Llama(LlamaConfig(vocab_size=64, hidden_size=C, intermediate_size=I, num_hidden_layers=layers,
                                      num_attention_heads=nh, num_key_value_heads=kv_heads, head_dim=16,
                                      max_position_embeddings=256, model_type=kind, **keep))
        else:
            names = ("hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob")
            keep = {k: config[k] for k in names if k in config}
            model = BertClassifier(BertConfig(vocab_size=64, hidden_size=C, num_hidden_layers=layers,
                                              num_attention_heads=nh, intermediate_size=I, max_position_embeddings=256,
                                              **keep), labels)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        if is_lm:
            model.tie_weights()
        if quant is not None:
            quantize_linears(model, quant)
        if lora is not None:
            add_lora(model, lora)
        return model.train()

    def saved(layers, B, T):
        model = build(layers)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        found = {}

        def keep(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                found[storage.data_ptr()] = (storage.nbytes(), t.dtype in (torch.uint8, torch.bool))
            return t
        ids = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
            out = model(ids, output_layer=False) if is_lm else model(ids, torch.ones_like(ids))
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held_on_context(out)
                if t.untyped_storage().data_ptr() not in params | found.keys()}
        kept = sum(n for n, mask in found.values() if not mask)
        masks = sum(n for n, mask in found.values() if mask)
        return kept, masks, sum(held.values())

    # A whole step first, backward and AdamW's step included: it starts what every run starts
    # (thread pools, kernels, their buffers), so that the memory measured after it holds them.
    model, ids = build(1), torch.randint(0, 64, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids) if is_lm else model(ids, torch.ones_like(ids))
    out.float().mean().backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True).step()
    if importlib.util.find_spec("matplotlib"):       # the run draws its plots with it
        import matplotlib.pyplot  # noqa: F401
    shapes = [(2, 32), (4, 32), (2, 64)]
    one = [saved(1, B, T) for B, T in shapes]
    two = [saved(2, B, T) for B, T in shapes]
    A = np.array([[B * T * C, B * nh * T * T, 1] for B, T in shapes], dtype=float)
    fit = lambda y: np.linalg.lstsq(A, np.array(y, dtype=float), rcond=None)[0]
    block = fit([t[0] - o[0] for t, o in zip(two, one)])
    masks = fit([t[1] - o[1] for t, o in zip(two, one)])
    held = fit([t[2] - o[2] for t, o in zip(two, one)])
    outside = fit([2 * o[0] - t[0] + 2 * o[1] - t[1] + 2 * o[2] - t[2] for t, o in zip(two, one)])
    return {"block": block, "masks": masks, "held": held, "outside": outside}


def held_on_context(output):
    """Tensors that autograd functions keep as attributes of their context instead of saving them
    (bitsandbytes' 8-bit layers keep their input so): saved-tensor hooks do not see them, and
    checkpointing does not drop them."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield from (v for v in getattr(node, "__dict__", {}).values() if isinstance(v, torch.Tensor))
        stack.extend(f for f, _ in node.next_functions)


_probes = {}


def estimate(config, batch, seq, *, bf16=False, quant=None, lora=None, checkpointing=False, labels=2, chunked_loss=True,
             on_gpu=False, baseline=None, chunk=512, background_saving=False, dropout=True, logits=True,
             reference_pass=False, optim="adamw"):
    """{component: bytes}, "total" (the peak: on CPU the process's resident memory, on a GPU the
    memory torch allocates) and "needed" (what the run still has to find), before it starts.
    Preference tuning: `dropout` False (it is off), `logits` False for a reward model (its head reads
    the hidden states, never the vocabulary), `reference_pass` for DPO's reference under LoRA."""
    is_lm = config["model_type"] != "bert"
    if not dropout:          # the probe then measures the model as it trains: no masks, no dropped copies kept
        config = config | {k: 0.0 for k in ("embd_pdrop", "attn_pdrop", "resid_pdrop", "attention_dropout")
                           if k in config}
    C, nh, L, inner = dims(config)
    V = config["vocab_size"]
    counts = parameter_counts(config, labels)
    total_params = counts["linear"] + counts["other"]
    key = (repr(sorted(config.items())), repr(quant), repr(lora), bf16, labels)
    if key not in _probes:
        with torch.random.fork_rng(devices=[]):      # the probe's seeds must not move the run's
            _probes[key] = probe(config, quant, lora, bf16, labels)
    act = _probes[key]
    already = 0 if on_gpu else (baseline if baseline is not None else rss_now())
    parts = {"the libraries, data and tokenizer (measured now)": already} if not on_gpu else {}
    if quant is not None:
        linear = quantized_bytes(counts["linear"], quant.mode, quant.double_quant)
        parts[f"weights (linear layers in {quant.mode}, the rest fp32)"] = linear + 4 * counts["other"]
    else:
        parts["weights (fp32)"] = 4 * total_params
    trainable = total_params
    if lora is not None:
        trainable = lora_count(config, lora.r, lora.targets) + (0 if is_lm else C * labels + labels)
        parts[f"LoRA weights (r {lora.r})"] = 4 * lora_count(config, lora.r, lora.targets)
    parts["gradients (fp32, of what trains)"] = 4 * trainable
    state = STATE_BYTES[optim] * trainable
    parts[f"optimizer state ({'AdamW: two moments' if optim == 'adamw' else 'AdamW: two moments in 8 bits'})"] = state
    if optim == "adamw8bit" and not on_gpu:
        # bitsandbytes' CPU step decodes one tensor's moments at a time into fp32 and steps it with
        # ordinary tensor operations: five fp32 copies of the largest tensor at once (measured)
        largest = V * C if lora is None else lora.r * max(C, inner)
        parts["the 8-bit step's fp32 temporaries (its largest tensor, decoded)"] = 5 * 4 * largest
    if background_saving:     # an epoch's weights and moments, copied, written while the next epoch trains
        parts["saving in the background: a copy of the weights and moments"] = 4 * (
            total_params if lora is None else trainable) + state
    BTC, attention = batch * seq * C, batch * nh * seq * seq
    per_block = lambda fit: max(0.0, fit[0] * BTC + fit[1] * attention + fit[2])
    # Checkpointing keeps each block's input (fp32) and recomputes one block at a time in backward;
    # it drops what autograd saved, but not what a function holds on its context.
    held = L * per_block(act["held"])
    kept = {False: L * per_block(act["block"]) + per_block(act["outside"]) + held,
            True: L * 4 * BTC + per_block(act["block"]) + per_block(act["outside"]) + held}
    masks = {False: L * per_block(act["masks"]), True: per_block(act["masks"])}
    parts["activations kept for backward" + (" (--grad-checkpointing)" if checkpointing else "")] = kept[checkpointing]
    if dropout:
        parts["dropout masks"] = masks[checkpointing]
    rows = batch * seq
    if is_lm and logits and chunked_loss:
        # a chunk's logits in fp32, their softmax and gradient made in place; in bf16 also one bf16
        # copy beside them (the product's own result, then the gradient's cast)
        logits = min(chunk, rows) * V * (6 if bf16 else 4)
        parts[f"output layer: logits, {min(chunk, rows)} positions at a time"] = logits
        if bf16:
            parts["output layer: its weight in bf16, for the step"] = 2 * V * C
    elif is_lm and logits:
        parts["output layer: the full logits, their softmax and gradient"] = rows * V * 4 * 3
    if reference_pass and logits:
        # the same model with its adapters off, without gradients, after the pass that trains: its
        # activations are freed layer by layer, but its logits and their log-softmax (fp32) are whole
        parts["the reference's pass (adapters off): its logits and their log-softmax"] = rows * V * 4 * 2
    # the largest single temporary besides: a layer's MLP product or the attention scores, and its gradient
    parts["the largest temporary"] = 2 * 4 * max(rows * inner, attention)
    if not on_gpu:
        # glibc's malloc hands freed memory back to the next tensors that fit in it; activations and
        # temporaries of many sizes, freed in a different order than they were made, leave pieces
        # that nothing fits, and the process keeps them. Training and evaluation also load kernels
        # and start buffers the warm-up did not. Both measured (bench/memory.py), not derived; a GPU
        # counts live tensors only.
        made_and_freed = kept[checkpointing] + masks[checkpointing] + parts["gradients (fp32, of what trains)"] + sum(
            v for k, v in parts.items() if k.startswith(("output layer: logits", "the largest")))
        pieces = ALLOCATOR_KEEPS * made_and_freed + RUN_ADDS
        parts["the allocator: freed memory kept in pieces, and kernels' buffers"] = pieces
        if lora is not None:
            # Each adapted layer makes full-width tensors a plain layer does not (the frozen layer's
            # output, the update, their sum, the dropped input), and the small tensors a block keeps
            # land in the holes they leave: every block's MLP-wide temporaries then need fresh heap.
            pieces = ADAPTER_PIECES * L * rows * inner * (2 if bf16 else 4)
            parts["the allocator: pieces between LoRA's temporaries"] = pieces
    parts["total"] = sum(parts.values())
    swap = kept[not checkpointing] + masks[not checkpointing] - kept[checkpointing] - masks[checkpointing]
    other = parts["total"] + swap * (1 + (0 if on_gpu else ALLOCATOR_KEEPS))
    parts["total without --grad-checkpointing" if checkpointing else "total with --grad-checkpointing"] = other
    parts["needed"] = parts["total"] - already
    return parts


def free_memory(device):
    """Bytes the run can still take: the machine's available memory, or the GPU's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory() if device.type == "cpu" else None


def measured_peak(device):
    """The run's measured peak: resident memory of the process on CPU (the libraries included), the
    most torch allocated on a GPU."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def what_fits(config, settings, free, grad_accum):
    """The first of the usual ways to save memory that brings the estimate under `free`, as flags."""
    from ..lora import DEFAULT_TARGETS, LoRAConfig
    from ..quantize import QuantConfig
    batch = settings["batch"]
    tries = [({"checkpointing": True}, "--grad-checkpointing")]
    while batch > 1:
        batch //= 2
        steps = grad_accum * settings["batch"] // batch
        tries.append(({"checkpointing": True, "batch": batch}, f"--grad-checkpointing --batch-size {batch}"
                                                               f" --grad-accum {steps}"))
    lora = settings["lora"] or LoRAConfig(DEFAULT_TARGETS[config["model_type"]])
    tries.append(({"checkpointing": True, "batch": 1, "quant": QuantConfig("4bit"), "lora": lora},
                  f"--quantize 4bit --grad-checkpointing --batch-size 1 --grad-accum {grad_accum * settings['batch']}"))
    for change, flags in tries:
        parts = estimate(config, **(settings | change))
        if parts["needed"] <= free:
            return f"{flags} (about {parts['total'] / MiB:,.0f} MiB)"
    return None


def format_estimate(parts, batch, seq):
    lines = [f"memory: the run's peak, estimated before loading the model (batches of {batch} x {seq} tokens):"]
    for name, value in parts.items():
        if not name.startswith("total") and name != "needed":
            lines.append(f"  {name:<62}{value / MiB:>9,.0f} MiB")
    other = next(k for k in parts if k.startswith("total "))
    lines.append(f"  {'peak':<62}{parts['total'] / MiB:>9,.0f} MiB   ({other[6:]}: {parts[other] / MiB:,.0f} MiB)")
    return "\n".join(lines)


def check(args, run, config, report, num_labels):
    """The run's peak memory, estimated before the model is loaded from config.json and the
    longest batch (examples are padded to the longest in their batch; --pack fills every row). A
    run that would not fit stops here, with the settings that would. Returns the estimate."""
    lengths = report["lengths"]
    seq = lengths["max_length"] if run.task == "lm" and args.pack else min(lengths["max"], lengths["max_length"])
    if tricks.enabled("few_shapes"):                # data.make_batch pads each batch on to a multiple of 8
        seq = tricks.padded_width(seq, lengths["max_length"])
    # preference pairs: two rows a pair (chosen and rejected), dropout off (preference.without_dropout);
    # DPO takes the full logits for the answers' log-probabilities, and under LoRA a reference pass at
    # each step (without LoRA the reference's log-probabilities are computed before training, in less);
    # a reward model's head reads the last hidden state, with no logits at all
    pairs = run.task in preference.TASKS
    settings = dict(batch=args.batch_size * (2 if pairs else 1), seq=seq, bf16=args.bf16, quant=run.quant,
                    lora=run.lora,
                    checkpointing=args.grad_checkpointing, labels=num_labels,
                    chunked_loss=tricks.enabled("chunked_loss") and not pairs, on_gpu=run.device.type == "cuda",
                    dropout=not pairs, logits=run.task != "reward", reference_pass=run.task == "dpo" and bool(run.lora),
                    optim=args.optim, background_saving=tricks.enabled("background_saving")
                    and saves_in_background(run, min(args.epochs, args.stop_after_epochs or args.epochs)))
    parts = estimate(config, **settings)
    run.print(format_estimate(parts, settings["batch"], seq))
    free = free_memory(run.device)
    if free is not None and parts["needed"] > free and not args.fsdp:     # (FSDP shards what is counted here)
        fits = what_fits(config, settings, free, args.grad_accum)
        advice = (f"try {fits}" if fits else "even --quantize 4bit with LoRA, --grad-checkpointing and --batch-size 1"
                  " would not fit; use a smaller model")
        raise NanotuneError(f"the run needs about {parts['needed'] / MiB:,.0f} MiB more but {run.device.type} has"
                            f" {free / MiB:,.0f} MiB free: {advice}")
    return parts


def report_peak(estimate, device, log, say):
    """The measured peak beside the estimate, printed and kept in metrics.jsonl."""
    measured = measured_peak(device)
    say(f"memory: peak {measured / MiB:,.0f} MiB measured, {estimate['total'] / MiB:,.0f} MiB estimated"
        f" ({(estimate['total'] - measured) / measured:+.0%})")
    log.log("memory", measured_mib=round(measured / MiB), estimated_mib=round(estimate["total"] / MiB),
            error=round((estimate["total"] - measured) / measured, 4),
            estimate={k: round(v / MiB, 1) for k, v in estimate.items()})
