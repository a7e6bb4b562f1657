"""What did quantization cost? The error of every quantized layer, weight and output, measured
against the checkpoint's full-precision weights, one layer at a time: the full model is never
held in memory beside the quantized one."""
import torch
import torch.nn.functional as F

from . import hub
from .quantize import QuantConfig, dequantized_weight


def relative_error(approx, exact):
    """||approx - exact|| / ||exact||, Frobenius norms."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30))


def quantized_layers(model):
    """{checkpoint layer name: quantized layer}; under a LoRA adapter the layer is its `base_layer`."""
    return {name.removesuffix(".base_layer"): m for name, m in model.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")}


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
        row = {"layer": name, "weight_error": relative_error(dequantized_weight(layer), weight),
               "output_error": relative_error(layer(x.to(layer.bias.dtype if layer.bias is not None else x.dtype)), exact)}
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
    from .tricks import quantize_4bit_by_rows
    packed, state = quantize_4bit_by_rows(weight, q)
    return dequantize_4bit(packed, state).float()


FOUR_BIT_VARIANTS = [QuantConfig("4bit", t, d) for t in ("nf4", "fp4") for d in (True, False)]


def summary(rows, worst=3):
    """One paragraph: the mean errors and the worst layers."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    lines = [f"{len(rows)} quantized layers: weight error mean {mean('weight_error'):.2%}, output error mean {mean('output_error'):.2%};"
             f" worst outputs: " + ", ".join(f"{r['layer']} {r['output_error']:.2%}" for r in rows[:worst])]
    return "\n".join(lines)


def format_layers(rows):
    width = max(len(r["layer"]) for r in rows) + 2
    lines = [f"{'layer':<{width}}weight error  output error"]
    lines += [f"{r['layer']:<{width}}{r['weight_error']:>12.2%}{r['output_error']:>14.2%}" for r in rows]
    return "\n".join(lines)
