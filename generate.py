"""Generate text with a fine-tuned GPT-2, or label text with a fine-tuned BERT classifier.

    python generate.py --model out/ --prompt "Once upon a time, in the legendary kingdom of Camelot,"
    python generate.py --model out-sentiment/ --prompt "The soup was cold." --prompt "Lovely staff!"

With no --prompt, GPT-2 samples from scratch (starting after an end-of-text token).
`python generate.py --help` lists every option.
"""
import argparse
import importlib.util
import json
import os
import sys

import torch

from nanotune import NanotuneError, hub, load_tokenizer, tricks
from nanotune.cli import ArgumentParser, add_plain_flag, default_device, device, number, run, text, whole_number
from nanotune.data import read_examples, truncate
from nanotune.evaluate import classification_report, classify_all, format_classification, lm_perplexity, plot_confusion, top_losses
from nanotune.export import check_can_export, export_onnx
from nanotune.explain import explain_prediction, explain_step, format_prediction, format_steps, use_colour
from nanotune.fidelity import FOUR_BIT_VARIANTS, format_layers, layer_errors, variant_name
from nanotune.generation import generate
from nanotune.lora import load_adapter, merge_lora, read_adapter_config
from nanotune.models import check_tokenizer_fits, load_model
from nanotune.quantize import QuantConfig
from nanotune.serve import serve

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parser():
    """Every flag is checked as it is read: a value out of range stops here, before any work."""
    p = ArgumentParser(description="Generate text (GPT-2) or predict labels (BERT classifier).")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=text("a Hub id or a model folder"),
                   help="Hub id, or a folder train.py wrote (a full model, or a LoRA adapter with its base named inside); default: out")
    g.add_argument("--adapter", type=text("an adapter folder"), help="a LoRA adapter folder (PEFT layout) to apply to --model")
    g.add_argument("--quantize", choices=["8bit", "4bit"], help="load the linear layers in 8 or 4 bits (bitsandbytes)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and compute precision")
    g.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    g = p.add_argument_group("input")
    g.add_argument("--prompt", action="append", help="text to continue or classify; repeat for a batch")
    g.add_argument("--prompt-file", type=text("a file"), help="a file with one prompt per line")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=whole_number(1), default=100)
    g.add_argument("--temperature", type=number(0), default=0.8, help="0 picks the most likely token every time (greedy)")
    g.add_argument("--top-k", type=whole_number(0), default=50, help="sample only among the k most likely tokens; 0 for all")
    g.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0, help="sample only among the most likely tokens that make up this probability")
    g.add_argument("--repetition-penalty", type=number(0, low_open=True), default=1.0, help="above 1 makes repeating a token less likely")
    g.add_argument("--stop", action="append", default=[], type=text("the text to stop at"), help="stop when this text appears (repeatable)")
    g.add_argument("--num-samples", type=whole_number(1), default=1, help="continuations per prompt")
    g.add_argument("--seed", type=whole_number(0, 2**63 - 1), help="same seed, same samples")
    g = p.add_argument_group("evaluate: how good is the model on a file (same formats as training)")
    g.add_argument("--eval", metavar="FILE", type=text("a data file"), help="report loss and perplexity (LM) or accuracy, per-label scores and confusion (classifier)")
    g.add_argument("--text-column", default="text", type=text("a column name"), help="text field of .jsonl/.csv/.tsv files")
    g.add_argument("--label-column", default="label", type=text("a column name"), help="label field of .jsonl/.csv/.tsv files")
    g.add_argument("--stride", type=whole_number(1), help="LM: texts longer than the context are read in overlapping windows this many tokens apart (default and most: the context less one)")
    g.add_argument("--top-losses", type=whole_number(0), default=5, metavar="K", help="classifier: show the K examples it got most confidently wrong")
    g.add_argument("--plot", metavar="PNG", type=text("a file name"), help="classifier: draw the confusion matrix into this PNG (needs matplotlib)")
    g.add_argument("--compare", action="store_true", help="with --quantize: the full-precision model beside the quantized one, and each quantized layer's error")
    g.add_argument("--json", action="store_true", help="print the results of --eval or --explain as one JSON object")
    g = p.add_argument_group("explain: why the model said that")
    g.add_argument("--explain", action="store_true", help="classifier: integrated gradients for each token; LM: each step's candidates, filter by filter")
    g.add_argument("--ig-steps", type=whole_number(1), default=32, help="integrated gradients: points on the path from the baseline")
    g.add_argument("--ig-baseline", choices=["pad", "zero"], default="pad", help="integrated gradients: every token replaced by padding, or zero embeddings")
    g.add_argument("--show-attention", action="store_true", help="classifier: also the last layer's [CLS] attention, per head")
    g.add_argument("--explain-top", type=whole_number(1), default=5, metavar="N", help="LM: candidates shown at each stage")
    g = p.add_argument_group("serve and export")
    g.add_argument("--serve", action="store_true", help="serve the model over HTTP in the OpenAI API's format (/v1/completions, /v1/classify)")
    g.add_argument("--host", default="127.0.0.1", type=text("a host name or address"), help="--serve: the address to listen on (0.0.0.0: every network)")
    g.add_argument("--port", type=whole_number(0, 65535), default=8000, help="--serve: the port (0: any free one)")
    g.add_argument("--api-key", type=text("a key"), help="--serve: require 'Authorization: Bearer KEY' (default: $NANOTUNE_API_KEY if set)")
    g.add_argument("--max-batch", type=whole_number(1, 256), default=32, help="--serve: most sequences decoded together")
    g.add_argument("--export-onnx", metavar="FILE", type=text("a file name"), help="write the model as ONNX (adapters merged first) and check it with onnxruntime")
    add_plain_flag(p)
    return p


def parse_args(argv=None):
    return parser().parse_args(argv)


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            prompts += [line for line in open(args.prompt_file, encoding="utf-8").read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise NanotuneError(f"--prompt-file {args.prompt_file} cannot be read ({e}): give a UTF-8 text file, one prompt a line") from None
    if any(not p.strip() for p in prompts):
        raise NanotuneError("a prompt is empty: give some text, or leave --prompt out to sample from scratch")
    return prompts


class Printer:
    """Streams one sequence to the terminal as it grows, or collects each; trims stop strings.
    Decoding the whole continuation each time (not token by token) keeps multi-byte characters,
    which byte-level BPE can split across tokens, whole: an unfinished one decodes to U+FFFD."""

    def __init__(self, tokenizer, stops, stream):
        self.tokenizer, self.stops, self.stream = tokenizer, stops, stream
        self.texts, self.shown = {}, 0

    def __call__(self, i, new_ids):
        text = self.tokenizer.decode(new_ids)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        self.texts[i] = text if cut < 0 else text[:cut]
        if self.stream:
            hold = max((len(s) - 1 for s in self.stops), default=0)   # might be the start of a stop string
            ready = self.texts[i] if cut >= 0 else text[:len(text) - hold] if hold else text
            if not ready.endswith("\ufffd") and len(ready) > self.shown:
                print(ready[self.shown:], end="", flush=True)
                self.shown = len(ready)
        return cut >= 0

    def finish(self, i):
        if self.stream:   # what was held back for a stop string that never came
            print(self.texts.get(i, "")[self.shown:], flush=True)
        return self.texts.get(i, "")


def classify(model, tokenizer, prompts, device):
    if not prompts:
        raise NanotuneError("a classifier needs text: give --prompt or --prompt-file")
    ids, mask = tokenizer(prompts, max_length=model.config.max_position_embeddings)
    with torch.inference_mode():
        probs = model(ids.to(device), mask.to(device)).float().softmax(-1).cpu()
    labels = model.config.labels
    for prompt, p in zip(prompts, probs):
        print(f"{labels[int(p.argmax())]}\t" + "  ".join(f"{name}={v:.3f}" for name, v in zip(labels, p.tolist())) + f"\t{prompt}")


def evaluate_file(args, model, tokenizer):
    """--eval FILE: (results as a dict, the same as text)."""
    if hasattr(model, "lm_head"):
        examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=False)
        r = lm_perplexity(model, [tokenizer.encode(e["text"]) + [tokenizer.eos_id] for e in examples], args.stride)
        windows = f" ({r['long_texts']} longer than the context of {model.config.n_positions}, read in windows {r['stride']} tokens apart)" if r["long_texts"] else ""
        return r, (f"{r['texts']} texts, {r['tokens_scored']:,} tokens scored{windows}\n"
                   f"loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}")
    examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=True)
    names = model.config.labels
    unknown = sorted({e["label"] for e in examples} - set(names))
    if unknown:
        raise NanotuneError(f"--eval {args.eval} has labels the model does not know ({', '.join(unknown)}); it knows {', '.join(names)}")
    texts, labels = [e["text"] for e in examples], [names.index(e["label"]) for e in examples]
    sequences = [truncate(s, model.config.max_position_embeddings) for s in tokenizer.encode_batch(texts)]
    probs = classify_all(model, sequences, tokenizer.pad_id)
    r = classification_report(probs.argmax(-1).tolist(), labels, names)
    r["top_losses"] = top_losses(probs, labels, texts, names, args.top_losses)
    if args.plot:
        plot_confusion(r, args.plot)
    return r, format_classification(r, r["top_losses"])


def compare_quantized(args, model, tokenizer, base, device):
    """--compare: the full-precision model's scores beside the quantized one's, each quantized
    layer's error, and for 4-bit the other formats on the same weights."""
    quantized, quantized_text = evaluate_file(args, model, tokenizer)
    full_model = load_model(base, dtype=DTYPES[args.dtype], device=device)
    full, full_text = evaluate_file(argparse.Namespace(**vars(args) | {"plot": None, "top_losses": 0}), full_model, tokenizer)
    del full_model
    examples = read_examples(args.eval, args.text_column, args.label_column, with_labels=False)[:8]
    ids, mask = tokenizer([e["text"] for e in examples], max_length=getattr(model.config, "n_positions", None) or model.config.max_position_embeddings)
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    variants = FOUR_BIT_VARIANTS if args.quantize == "4bit" else []
    rows = layer_errors(model, hub.resolve(base), batch, variants)
    metric = "perplexity" if hasattr(model, "lm_head") else "accuracy"
    formats = {}
    for q in variants:
        variant_model = load_model(base, dtype=DTYPES[args.dtype], device=device, quantize=QuantConfig(q.mode, q.quant_type, q.double_quant, DTYPES[args.dtype]))
        formats[variant_name(q)] = {metric: evaluate_file(argparse.Namespace(**vars(args) | {"plot": None, "top_losses": 0}), variant_model, tokenizer)[0][metric],
                                    "weight_error": sum(r[variant_name(q)]["weight_error"] for r in rows) / len(rows),
                                    "output_error": sum(r[variant_name(q)]["output_error"] for r in rows) / len(rows)}
    result = {"full_precision": full, "quantized": quantized, "quantization": args.quantize, "layers": rows, "formats": formats}
    lines = [f"{metric}: full precision {full[metric]:.4f}, {args.quantize} {quantized[metric]:.4f}", "",
             f"quantized ({args.quantize}):", quantized_text, "", "full precision:", full_text, "",
             "each quantized layer, worst output first (relative errors against the checkpoint's weights, outputs on real inputs):",
             format_layers(rows)]
    if formats:
        lines += ["", f"4-bit formats on the same weights:   mean weight error  mean output error  {metric}"]
        lines += [f"  {name:<34}{v['weight_error']:>17.2%}{v['output_error']:>19.2%}  {v[metric]:.4f}" for name, v in formats.items()]
    return result, "\n".join(lines)


def explain_classifier(args, model, tokenizer, prompts):
    if not prompts:
        raise NanotuneError("--explain needs text: give --prompt or --prompt-file")
    results = [explain_prediction(model, tokenizer, p, args.ig_steps, args.ig_baseline, args.show_attention) for p in prompts]
    return results, "\n\n".join(format_prediction(r, colour=use_colour()) for r in results)


def load(args, device):
    """The model (with its adapter applied), the tokenizer, and the base model's name. A folder
    holding only an adapter names its base model in adapter_config.json."""
    base, adapter = args.model, args.adapter
    if base is None:                     # train.py's default --out
        if not os.path.isdir("out"):
            raise NanotuneError("no trained model in out/ (there is no such folder here): train one first with train.py, or pass --model")
        base = "out"
    if adapter is None and os.path.isfile(os.path.join(base, "adapter_config.json")) and not os.path.isfile(os.path.join(base, "config.json")):
        base, adapter = read_adapter_config(base).get("base_model_name_or_path"), base
        try:
            hub.resolve(base or "")
        except NanotuneError:
            raise NanotuneError(f"the adapter in {adapter} was trained on {base!r}, which is neither a folder here nor a model"
                                f" in the Hugging Face cache: pass its base model with --model BASE --adapter {adapter}") from None
    # bitsandbytes' fast CPU kernel for 4-bit inference has no backward, which --explain needs
    quant = QuantConfig(args.quantize, compute_dtype=DTYPES[args.dtype], cpu_inference_kernel=not args.explain) if args.quantize else None
    model = load_model(base, dtype=DTYPES[args.dtype], device=device, quantize=quant)
    if adapter is not None:
        load_adapter(model, adapter)
        if not args.quantize:     # fold it in: generation then costs what the base model costs
            merge_lora(model)
    has_tokenizer = adapter is not None and any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "vocab.json", "vocab.txt"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    check_tokenizer_fits(model, tokenizer, adapter if has_tokenizer else base)
    return model.eval(), tokenizer, base


def main(args):
    if args.plain:
        tricks.turn_off(args.plain)   # the textbook version of every step
    prompts = read_prompts(args)
    device = torch.device(args.device or default_device())
    if device.type == "cpu" and tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()    # each new token reuses the memory of the last one's tensors
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise NanotuneError("--plot draws with matplotlib, which is not installed: pip install matplotlib")
    if args.compare and not (args.quantize and args.eval):
        raise NanotuneError("--compare sets a quantized model beside the full-precision one: use it with --quantize and --eval")
    if args.export_onnx:
        if args.quantize:
            raise NanotuneError("--export-onnx writes a full-precision model: leave --quantize out")
        check_can_export(args.export_onnx)
    model, tokenizer, base = load(args, device)
    if args.export_onnx:
        checked = export_onnx(model, args.export_onnx, model.config.vocab_size)
        print(f"wrote {args.export_onnx}; onnxruntime's logits differ from nanotune's by at most {checked['max_logit_difference']:.2e}"
              + (f", and its {checked['greedy_tokens']} greedy tokens are {'the same' if checked['greedy_identical'] else 'NOT the same'}"
                 if "greedy_tokens" in checked else ""))
        return 0 if checked["max_logit_difference"] <= 1e-4 and checked.get("greedy_identical", True) else 1
    if args.serve:
        return serve(model, tokenizer, args.model or "out", args.host, args.port, args.api_key or os.environ.get("NANOTUNE_API_KEY"), args.max_batch)
    if args.eval or (args.explain and not hasattr(model, "lm_head")):
        if args.eval:
            result, text = (compare_quantized(args, model, tokenizer, base, device) if args.compare
                            else evaluate_file(args, model, tokenizer))
        else:
            result, text = explain_classifier(args, model, tokenizer, prompts)
        print(json.dumps(result, indent=2) if args.json else text)
        return 0
    if not hasattr(model, "lm_head"):
        return classify(model, tokenizer, prompts, device)

    context = model.config.n_positions
    encoded = [tokenizer.encode(p) for p in prompts] or [[tokenizer.bos_id]]
    for p, ids in zip(prompts, encoded):
        if len(ids) >= context:
            raise NanotuneError(f"a prompt is {len(ids)} tokens, and the model's context is {context}: shorten it ({p[:40]!r}...)")
    if max(map(len, encoded)) + args.max_new_tokens > context:
        print(f"note: the context holds {context} tokens, so generation stops there", file=sys.stderr)
    sequences = [ids for ids in encoded for _ in range(args.num_samples)]
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    if args.explain:
        return explain_generation(args, model, tokenizer, sequences, prompts, generator)
    printer = Printer(tokenizer, args.stop, stream=len(sequences) == 1)
    if printer.stream and prompts:
        print(prompts[0], end="", flush=True)
    generate(model, sequences, args.max_new_tokens, tokenizer.pad_id, tokenizer.eos_id, args.temperature,
             args.top_k or None, args.top_p, args.repetition_penalty, generator, on_token=printer)
    for i in range(len(sequences)):
        if printer.stream:
            printer.finish(i)
        else:
            prompt = prompts[i // args.num_samples] if prompts else ""
            print(f"--- prompt {i // args.num_samples + 1}, sample {i % args.num_samples + 1}\n{prompt}{printer.finish(i)}")
    return 0


def explain_generation(args, model, tokenizer, sequences, prompts, generator):
    """--explain with a language model: every step of every sequence, filter by filter."""
    steps = [[] for _ in sequences]
    decode = lambda i: tokenizer.decode([i], skip_special_tokens=False)
    top_k = args.top_k or None

    def on_step(logits, seen, tokens):
        for i, token in enumerate(tokens.tolist()):
            steps[i].append(explain_step(logits[i], None if seen is None else seen[i], token, args.temperature, top_k,
                                         args.top_p, args.repetition_penalty, decode, args.explain_top))
    new = generate(model, sequences, args.max_new_tokens, tokenizer.pad_id, tokenizer.eos_id, args.temperature,
                   top_k, args.top_p, args.repetition_penalty, generator, on_step=on_step)
    steps = [s[:len(n) + 1] for s, n in zip(steps, new)]       # up to the step that ended the sequence
    texts = [prompts[i // args.num_samples] if prompts else "" for i in range(len(sequences))]
    if args.json:
        print(json.dumps([{"prompt": t, "text": tokenizer.decode(n), "steps": s} for t, n, s in zip(texts, new, steps)], indent=2))
    else:
        print("\n\n".join(format_steps(t, s) + f"\ntext: {t + tokenizer.decode(n)!r}" for t, n, s in zip(texts, new, steps)))
    return 0


if __name__ == "__main__":
    run(main, parse_args)
