"""Generate text with a fine-tuned GPT-2, or label text with a fine-tuned BERT classifier.

    python generate.py --model out/ --prompt "Once upon a time, in the legendary kingdom of Camelot,"
    python generate.py --model out-sentiment/ --prompt "The soup was cold." --prompt "Lovely staff!"

With no --prompt, GPT-2 samples from scratch (starting after an end-of-text token).
`python generate.py --help` lists every option.
"""
import os
import sys

import torch

from nanotune import NanotuneError, hub, load_tokenizer, tricks
from nanotune.cli import ArgumentParser, default_device, device, number, run, text, trick_names, whole_number
from nanotune.generation import generate
from nanotune.lora import load_adapter, merge_lora, read_adapter_config
from nanotune.models import check_tokenizer_fits, load_model
from nanotune.quantize import QuantConfig

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
    g = p.add_argument_group("reading the code")
    g.add_argument("--plain", nargs="?", const="all", type=trick_names, metavar="TRICKS",
                   help="turn the speed tricks off and run the textbook version of every step (or only of TRICKS,"
                        f" comma-separated: {', '.join(tricks.NAMES)}); see nanotune/tricks.py")
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


def load(args, device):
    """The model (with its adapter applied) and the tokenizer. A folder holding only an adapter
    names its base model in adapter_config.json."""
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
    quant = QuantConfig(args.quantize, compute_dtype=DTYPES[args.dtype], cpu_inference_kernel=True) if args.quantize else None
    model = load_model(base, dtype=DTYPES[args.dtype], device=device, quantize=quant)
    if adapter is not None:
        load_adapter(model, adapter)
        if not args.quantize:     # fold it in: generation then costs what the base model costs
            merge_lora(model)
    has_tokenizer = adapter is not None and any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "vocab.json", "vocab.txt"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    check_tokenizer_fits(model, tokenizer, adapter if has_tokenizer else base)
    return model.eval(), tokenizer


def main(args):
    if args.plain:
        tricks.turn_off(args.plain)   # the textbook version of every step
    prompts = read_prompts(args)
    device = torch.device(args.device or default_device())
    if device.type == "cpu" and tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()    # each new token reuses the memory of the last one's tensors
    model, tokenizer = load(args, device)
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


if __name__ == "__main__":
    run(main, parse_args)
