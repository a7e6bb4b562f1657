"""What did quantization cost? The error of every quantized layer, weight and output, measured
against the checkpoint's full-precision weights, one layer at a time: the full model is never
held in memory beside the quantized one. `compare` (generate.py --eval --compare) scores the
quantized model beside the full-precision one; `merge_drift` (train.py --merge) what merging costs."""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import hub
from ..data import read_examples
from ..files import write_json
from ..lora import load_adapter, merge_lora
from ..models import load_model
from ..quantize import QuantConfig, dequantized_weight
from ..run.generate_flags import DTYPES
from .evaluate_file import evaluate_file


def relative_error(approx, exact):
    """||approx - exact|| / ||exact||, Frobenius norms."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30))


def quantized_layers(model):
    """{checkpoint layer name: quantized layer}; under a LoRA adapter the layer is its `base_layer`."""
    return {name.removesuffix(".base_layer"): m for name, m in model.named_modules()
            if type(m).__name__ in ("Linear8bitLt", "Linear4bit")}


@torch.no_grad()
def layer_inputs(model, batch, layers):
    """The input of each layer ({name: module}) on a real batch, as (rows, in_features)."""
    inputs, handles = {}, []

    def keep(name, x):               # a hook that returns something would replace the layer's output
        inputs[name] = x.reshape(-1, x.shape[-1]).float()
    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(lambda m, args, out, name=name: keep(name, args[0])))
    try:
        model(batch["input_ids"], batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return inputs


def full_precision_weights(model, folder):
    """(layer name, fp32 weight) of every quantized layer, read from the checkpoint one at a time."""
    layers = quantized_layers(model)
    for key, tensor in hub.iter_checkpoint(folder):
        name = model.hub_to_name(key)
        if name is None or not name.endswith(".weight") or name[:-len(".weight")] not in layers:
            continue
        from_hub = getattr(type(model), "from_hub", None)
        yield name[:-len(".weight")], (from_hub(name, tensor) if from_hub else tensor).float()


@torch.no_grad()
def layer_errors(model, folder, batch, variants=()):
    """For each quantized layer of `model` (loaded from `folder`): the relative error of its
    weight, ||W - deq(Q(W))|| / ||W||, and of its output on the batch's real inputs, worst first.
    `variants` (QuantConfigs, 4-bit) are measured on the same weights and inputs, for comparison."""
    layers = quantized_layers(model)
    inputs = layer_inputs(model, batch, layers)
    rows = []
    for name, weight in full_precision_weights(model, folder):
        layer, x = layers[name], inputs[name]
        bias = None if layer.bias is None else layer.bias.float()
        exact = F.linear(x, weight, bias)
        dtype = layer.bias.dtype if layer.bias is not None else x.dtype
        row = {"layer": name, "weight_error": relative_error(dequantized_weight(layer), weight),
               "output_error": relative_error(layer(x.to(dtype)), exact)}
        for q in variants:
            approx = variant_weight(weight, q)
            row[variant_name(q)] = {"weight_error": relative_error(approx, weight),
                                    "output_error": relative_error(F.linear(x, approx, bias), exact)}
        rows.append(row)
    return sorted(rows, key=lambda r: -r["output_error"])


def variant_name(q: QuantConfig):
    return f"{q.quant_type}{' double-quant' if q.double_quant else ''}"


def variant_weight(weight, q):
    """A weight quantized to 4 bits as `q` says, and de-quantized again."""
    from bitsandbytes.functional import dequantize_4bit

    from ..tricks import quantize_4bit_by_rows
    packed, state = quantize_4bit_by_rows(weight, q)
    return dequantize_4bit(packed, state).float()


FOUR_BIT_VARIANTS = [QuantConfig("4bit", t, d) for t in ("nf4", "fp4") for d in (True, False)]


def summary(rows, worst=3):
    """One paragraph: the mean errors and the worst layers."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    worst = ", ".join(f"{r['layer']} {r['output_error']:.2%}" for r in rows[:worst])
    return (f"{len(rows)} quantized layers: weight error mean {mean('weight_error'):.2%}, output error mean"
            f" {mean('output_error'):.2%}; worst outputs: {worst}")


def format_layers(rows):
    width = max(len(r["layer"]) for r in rows) + 2
    lines = [f"{'layer':<{width}}weight error  output error"]
    lines += [f"{r['layer']:<{width}}{r['weight_error']:>12.2%}{r['output_error']:>14.2%}" for r in rows]
    return "\n".join(lines)


def report(model, folder, quantize, quant_type, double_quant, texts, tokenizer, context, device, say):
    """What quantizing costs each layer, on a batch of the training data (`texts`), against the
    checkpoint's full-precision weights: printed, and returned for OUT/quantization.json."""
    ids, mask = tokenizer(texts, max_length=context)
    rows = layer_errors(model, folder, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    say(f"quantization ({quantize}{' ' + quant_type if quantize == '4bit' else ''}): {summary(rows)}")
    return {"quantization": quantize, "quant_type": quant_type, "double_quant": double_quant, "layers": rows}


@torch.no_grad()
def merge_drift(trained, merged, batch, evaluate):
    """How far the merged model is from the quantized base + adapter that was trained: merging
    folds the adapter into de-quantized weights, not quite the model that was trained."""
    trained.eval()
    merged.eval()
    difference = (trained(batch["input_ids"], batch["attention_mask"]).float()
                  - merged(batch["input_ids"], batch["attention_mask"]).float()).abs().max()
    return {"max_logit_difference": float(difference), "trained": evaluate(trained), "merged": evaluate(merged)}


def save_merged(args, run, labels, tokenizer, quantization, batch, validate):
    """--merge: the best adapter folded into the weights it trained with, in OUT/merged. For a
    quantized base, also how far merging moved the model (printed, and kept in quantization.json)."""
    out = Path(args.out)
    load_trained = lambda: load_adapter(load_model(args.model, labels=labels, device=run.device, quantize=run.quant,
                                                   new_head=args.new_head), out)
    merged = merge_lora(load_trained())
    merged.save_pretrained(out / "merged")
    tokenizer.save(out / "merged")
    run.print(f"merged model: {out / 'merged'}/")
    if quantization and batch is not None:
        drift = quantization["merge"] = merge_drift(load_trained(), merged, batch, validate)
        write_json(quantization, out / "quantization.json")
        run.print(f"merging moved the logits by up to {drift['max_logit_difference']:.4f}; validation"
                  f" loss {drift['trained']['loss']:.4f} (quantized base + adapter),"
                  f" {drift['merged']['loss']:.4f} (merged)")


def compare(args, model, tokenizer, base, device):
    """--compare: the full-precision model's scores beside the quantized one's, each quantized
    layer's error, and for 4-bit the other formats on the same weights."""
    quantized, quantized_text = evaluate_file(args, model, tokenizer)
    quietly = argparse.Namespace(**vars(args) | {"plot": None, "top_losses": 0})     # scores only
    full_model = load_model(base, dtype=DTYPES[args.dtype], device=device)
    full, full_text = evaluate_file(quietly, full_model, tokenizer)
    del full_model
    examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=False)[:8]
    context = model.config.context
    ids, mask = tokenizer([e["text"] for e in examples], max_length=context)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    variants = FOUR_BIT_VARIANTS if args.quantize == "4bit" else []
    rows = layer_errors(model, hub.resolve(base), batch, variants)
    metric = "perplexity" if hasattr(model, "lm_head") else "accuracy"
    formats = {}
    for q in variants:
        variant = QuantConfig(q.mode, q.quant_type, q.double_quant, DTYPES[args.dtype])
        variant_model = load_model(base, dtype=DTYPES[args.dtype], device=device, quantize=variant)
        formats[variant_name(q)] = {metric: evaluate_file(quietly, variant_model, tokenizer)[0][metric],
                                    "weight_error": sum(r[variant_name(q)]["weight_error"] for r in rows) / len(rows),
                                    "output_error": sum(r[variant_name(q)]["output_error"] for r in rows) / len(rows)}
    result = {"full_precision": full, "quantized": quantized, "quantization": args.quantize, "layers": rows,
              "formats": formats}
    lines = [f"{metric}: full precision {full[metric]:.4f}, {args.quantize} {quantized[metric]:.4f}", "",
             f"quantized ({args.quantize}):", quantized_text, "", "full precision:", full_text, "",
             "each quantized layer, worst output first (relative errors against the checkpoint's weights,"
             " outputs on real inputs):",
             format_layers(rows)]
    if formats:
        lines += ["", f"4-bit formats on the same weights:   mean weight error  mean output error  {metric}"]
        lines += [f"  {name:<34}{v['weight_error']:>17.2%}{v['output_error']:>19.2%}  {v[metric]:.4f}"
                  for name, v in formats.items()]
    return result, "\n".join(lines)
