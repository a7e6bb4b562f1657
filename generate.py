"""Generate text with a fine-tuned GPT-2, or label text with a fine-tuned BERT classifier.

    python generate.py --model out/ --prompt "Once upon a time, in the legendary kingdom of Camelot,"
    python generate.py --model out-sentiment/ --prompt "The soup was cold." --prompt "Lovely staff!"

`main` loads the model (and its adapter) and its tokenizer, then generates: the prompts are
encoded, `nanotune.generation.generate` continues them, and the text is printed as it grows. With
no --prompt, GPT-2 samples from scratch (starting after an end-of-text token). Evaluating,
explaining, serving and exporting are one line each below and live in nanotune/tools/.
`python generate.py --help` lists every option (nanotune/run/generate_flags.py).
"""
import importlib.util
import os
import sys

import torch

from nanotune import NanotuneError, hub, load_tokenizer, preference, tricks
from nanotune.chat import ChatTemplate, parse_tool_calls, read_template, read_tools, template_options
from nanotune.generation import generate
from nanotune.lora import load_adapter, merge_lora, read_adapter_config
from nanotune.models import check_tokenizer_fits, load_model
from nanotune.quantize import QuantConfig
from nanotune.run.cli import default_device, run
from nanotune.run.generate_flags import DTYPES, parse_args
from nanotune.tools import explain, export, lm_eval, quantization_error, serve
from nanotune.tools.evaluate_file import evaluate_file, show


def main(args):
    if args.plain:
        tricks.turn_off(args.plain)       # the textbook version of every step
    prompts = read_prompts(args)
    device = torch.device(args.device or default_device())
    if device.type == "cpu" and tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()        # each new token reuses the memory of the last one's tensors
    check_modes(args)
    model, tokenizer, base = load(args, device)
    is_lm = hasattr(model, "lm_head")
    template = conversation_template(args, tokenizer) if is_lm else None   # a chat model's way to write turns
    if args.export_onnx:                                   # an ONNX file, checked with onnxruntime
        return export.run(model, args.export_onnx)
    if args.export_gguf:                                   # a GGUF file for llama.cpp, read back to check it
        return export.run_gguf(model, tokenizer, args.export_gguf, args.gguf_type)
    if args.serve:                                         # an OpenAI-style HTTP server
        return serve.serve(model, tokenizer, args.model or "out", args.host, args.port,
                           args.api_key or os.environ.get("NANOTUNE_API_KEY"), args, template)
    if args.eval:                                          # scores on a file; --compare: beside full precision
        scores = quantization_error.compare if args.compare else lambda a, m, t, base, *_: evaluate_file(a, m, t, base)
        return show(args, *scores(args, model, tokenizer, base, device))
    if args.lm_eval: return lm_eval.run(args, model, tokenizer, template)   # lm-eval's tasks: scores to compare
    if args.explain and not is_lm:                         # integrated gradients for each token
        return show(args, *explain.explain_classifier(args, model, tokenizer, prompts))
    if not is_lm:
        return classify(model, tokenizer, prompts, device, args.batch_size)
    if args.chat:                                        # a conversation in the terminal
        return chat(args, model, tokenizer, template, device)

    # Generate: encode the prompts, continue them, print the text as it grows.
    context = model.config.context
    if template and prompts:                             # each prompt a user's message; the model answers it
        encoded = [template.encode(opening(args) + [{"role": "user", "content": p}], add_generation_prompt=True,
                                   tools=read_tools(args.tools)) for p in prompts]
    else:
        encoded = [tokenizer.encode(p) for p in prompts] or [[tokenizer.bos_id]]
    for p, ids in zip(prompts, encoded):
        if len(ids) >= context:
            raise NanotuneError(f"a prompt is {len(ids)} tokens, and the model's context is {context}:"
                                f" shorten it ({p[:40]!r}...)")
    if max(map(len, encoded)) + args.max_new_tokens > context:
        print(f"note: the context holds {context} tokens, so generation stops there", file=sys.stderr)
    sequences = [ids for ids in encoded for _ in range(args.num_samples)]
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    if args.explain:                                       # every sampling step, filter by filter
        return explain.explain_generation(args, model, tokenizer, sequences, prompts, generator)
    stops = template.stop_ids() if template else tokenizer.eos_id     # a chat model stops at its end of turn too
    printer = Printer(tokenizer, args.stop, stream=len(sequences) == 1)
    if printer.stream and prompts and not template:
        print(prompts[0], end="", flush=True)
    for start in range(0, len(sequences), args.batch_size):   # memory: one batch's, however many prompts
        batch = range(start, min(start + args.batch_size, len(sequences)))
        generate(model, sequences[batch.start:batch.stop], args.max_new_tokens, tokenizer.pad_id, stops,
                 args.temperature, args.top_k or None, args.top_p, args.repetition_penalty, generator,
                 on_token=lambda i, new_ids: printer(start + i, new_ids))
        for i in batch:
            if printer.stream:
                printer.finish(i)
            else:
                prompt = prompts[i // args.num_samples] + ("\n" if template else "") if prompts else ""
                print(f"--- prompt {i // args.num_samples + 1}, sample"
                      f" {i % args.num_samples + 1}\n{prompt}{printer.finish(i)}", flush=True)
    return 0


def conversation_template(args, tokenizer):
    """The chat template prompts go through: --chat-template's, or the model's own; None for a model
    without one (GPT-2) or with --raw."""
    if args.raw:
        if args.chat or args.system:
            raise NanotuneError("--chat and --system write through the chat template: leave out --raw")
        return None
    source = read_template(None, args.chat_template) if args.chat_template else tokenizer.chat_template
    if source is None:
        if args.chat or args.system or args.tools or args.enable_thinking:
            raise NanotuneError("this model has no chat template to write a conversation with: give one with"
                                " --chat-template FILE, or --chat-template chatml")
        return None
    return ChatTemplate(source, tokenizer, args.chat_template, template_options(source, args.enable_thinking))


def opening(args):
    return [{"role": "system", "content": args.system}] if args.system else []


def chat(args, model, tokenizer, template, device):
    """--chat: a conversation in the terminal. Every message, and every answer so far, goes back to
    the model through its chat template; each answer streams as it is written and ends at the
    model's end-of-turn token. Ctrl-D (end of input) ends the conversation."""
    history, stops, tools = opening(args), template.stop_ids(), read_tools(args.tools)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    print("a conversation: write a message and press Enter; Ctrl-D ends it", file=sys.stderr)
    while True:
        called = history and history[-1].get("tool_calls")
        try:
            message = input("tool result> " if called else "> ")
        except EOFError:
            return 0
        if not message.strip():
            continue
        history.append({"role": "tool" if called else "user", "content": message})
        ids = template.encode(history, add_generation_prompt=True, tools=tools)
        room = model.config.context - len(ids)
        if room < 1:
            raise NanotuneError(f"the conversation has grown to {len(ids)} tokens, the model's whole context:"
                                " start a new one")
        printer = Printer(tokenizer, args.stop, stream=True)
        generate(model, [ids], min(args.max_new_tokens, room), tokenizer.pad_id, stops, args.temperature,
                 args.top_k or None, args.top_p, args.repetition_penalty, generator, on_token=printer)
        answer = printer.finish(0)
        content, calls = parse_tool_calls(answer) if tools else (answer, [])
        for call in calls:                   # the model asks for a tool: the next line is its result
            print(f"tool call: {call['function']['name']}({call['function']['arguments']})", flush=True)
        history.append({"role": "assistant", "content": content} | ({"tool_calls": calls} if calls else {}))


def read_prompts(args):
    prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            prompts += [line for line in open(args.prompt_file, encoding="utf-8").read().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise NanotuneError(f"--prompt-file {args.prompt_file} cannot be read ({e}): give a UTF-8 text file,"
                                " one prompt a line") from None
    if any(not p.strip() for p in prompts):
        raise NanotuneError("a prompt is empty: give some text, or leave --prompt out to sample from scratch")
    return prompts


def check_modes(args):
    """Mode flags that need each other, checked before the model is loaded."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise NanotuneError("--plot draws with matplotlib, which is not installed: pip install matplotlib")
    if args.serve:
        serve.check_installed()
    if args.compare and not (args.quantize and args.eval):
        raise NanotuneError("--compare sets a quantized model beside the full-precision one: use it with"
                            " --quantize and --eval")
    for flag, path in (("--export-onnx", args.export_onnx), ("--export-gguf", args.export_gguf)):
        if path:
            if args.quantize:
                raise NanotuneError(f"{flag} writes the full-precision model: leave --quantize out")
            export.check_can_export(path, flag)


def load(args, device):
    """The model (with its adapter applied), the tokenizer, and the base model's name. A folder
    holding only an adapter names its base model in adapter_config.json."""
    base, adapter = args.model, args.adapter
    if base is None:                     # train.py's default --out
        if not os.path.isdir("out"):
            raise NanotuneError("no trained model in out/ (there is no such folder here): train one first"
                                " with train.py, or pass --model")
        base = "out"
    holds = lambda folder, name: os.path.isfile(os.path.join(folder, name))
    if adapter is None and holds(base, "adapter_config.json") and not holds(base, "config.json"):
        base, adapter = read_adapter_config(base).get("base_model_name_or_path"), base
        try:
            hub.resolve(base or "")
        except NanotuneError:
            raise NanotuneError(f"the adapter in {adapter} was trained on {base!r}, which is neither a folder"
                                " here nor a model in the Hugging Face cache: pass its base model with"
                                f" --model BASE --adapter {adapter}") from None
    # bitsandbytes' fast CPU kernel for 4-bit inference has no backward, which --explain needs
    quant = (QuantConfig(args.quantize, compute_dtype=DTYPES[args.dtype], cpu_inference_kernel=not args.explain)
             if args.quantize else None)
    model = load_model(base, dtype=DTYPES[args.dtype], device=device, quantize=quant)
    preference.load_score_head(model, adapter or base)   # a reward model (train.py --reward-model): its score head
    if adapter is not None:
        load_adapter(model, adapter)
        if not args.quantize:     # fold it in: generation then costs what the base model costs
            merge_lora(model)
    has_tokenizer = adapter is not None and any(holds(adapter, f) for f in ("tokenizer.json", "vocab.json",
                                                                            "vocab.txt"))
    tokenizer = load_tokenizer(adapter if has_tokenizer else base)
    check_tokenizer_fits(model, tokenizer, adapter if has_tokenizer else base)
    return model.eval(), tokenizer, base


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
        return self.texts.pop(i, "")


def classify(model, tokenizer, prompts, device, batch_size):
    """Each text's label and every label's probability, --batch-size texts at a time."""
    if not prompts:
        raise NanotuneError("a classifier needs text: give --prompt or --prompt-file")
    labels = model.config.labels
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        ids, mask = tokenizer(batch, max_length=model.config.max_position_embeddings)
        with torch.inference_mode():
            probs = model(ids.to(device), mask.to(device)).float().softmax(-1).cpu()
        for prompt, p in zip(batch, probs):
            scores = "  ".join(f"{name}={v:.3f}" for name, v in zip(labels, p.tolist()))
            print(f"{labels[int(p.argmax())]}\t{scores}\t{prompt}")
    return 0


if __name__ == "__main__":
    run(main, parse_args)
