"""generate.py's command line: every flag, checked as it is read."""
import argparse
import sys

import torch

from .cli import ArgumentParser, add_plain_flag, device, number, text, whole_number

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def size(value):
    """A number of bytes: 2GB, 512MB, 64KB or plain bytes."""
    units = {"GB": 2**30, "MB": 2**20, "KB": 2**10, "B": 1}
    text = value.strip().upper()
    unit = next((u for u in units if text.endswith(u)), "B")
    try:
        n = float(text[:len(text) - len(unit)] if text.endswith(unit) else text) * units[unit]
    except ValueError:
        n = 0
    if not n >= 1 or n == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a size: give a number of bytes with a unit, such as 2GB,"
                                         " 512MB or 64KB")
    return int(n)


def parser():
    """Every flag is checked as it is read: a value out of range stops here, before any work."""
    p = ArgumentParser(description="Generate text (GPT-2) or predict labels (BERT classifier).")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=text("a Hub id or a model folder"),
                   help="Hub id, or a folder train.py wrote (a full model, or a LoRA adapter with its base named"
                        " inside); default: out")
    g.add_argument("--adapter", type=text("an adapter folder"),
                   help="a LoRA adapter folder (PEFT layout) to apply to --model")
    g.add_argument("--quantize", choices=["8bit", "4bit"], help="load the linear layers in 8 or 4 bits (bitsandbytes)")
    g.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and compute precision")
    g.add_argument("--device", type=device, help="cpu, cuda, ... (default: cuda when available)")
    g = p.add_argument_group("input")
    g.add_argument("--prompt", action="append", type=prompt_text,
                   help="text to continue or classify; repeat for a batch")
    g.add_argument("--prompt-file", type=text("a file"), help="a file with one prompt per line")
    g = p.add_argument_group("chat: a model with a chat template")
    g.add_argument("--chat", action="store_true",
                   help="a conversation in the terminal: each message and the model's answers so far go through the"
                        " model's chat template")
    g.add_argument("--system", type=text("a system message"), help="--chat and --prompt: the system message that"
                   " opens the conversation")
    g.add_argument("--raw", action="store_true",
                   help="--prompt goes to the model as it is, not wrapped in the chat template as a user's message")
    g.add_argument("--chat-template", metavar="FILE", type=text("a template file or a built-in name"),
                   help="write conversations with this Jinja template (a file, or chatml) instead of the model's own")
    g.add_argument("--tools", metavar="FILE", type=text("a JSON file"),
                   help="--chat and --prompt: a JSON list of tool definitions (OpenAI's format) the template offers the"
                        " model; the tool calls it writes are shown, and in --chat the next line is their result")
    g.add_argument("--enable-thinking", choices=["on", "off"],
                   help="the chat template's enable_thinking switch (Qwen3): off makes the model answer without"
                        " thinking first (default: the template's own, on for Qwen3)")
    g = p.add_argument_group("sampling (chapter 2: temperature 0.7, sampling)")
    g.add_argument("--max-new-tokens", type=whole_number(1), default=100)
    g.add_argument("--temperature", type=number(0), default=0.7,
                   help="below 1 sharpens the distribution, above 1 flattens it; 0 picks the most likely token every"
                        " time (greedy)")
    g.add_argument("--top-k", type=whole_number(0), default=50,
                   help="sample only among the k most likely tokens; 0 for all")
    g.add_argument("--top-p", type=number(0, 1, low_open=True), default=1.0,
                   help="sample only among the most likely tokens that make up this probability")
    g.add_argument("--repetition-penalty", type=number(0, low_open=True), default=1.0,
                   help="above 1 makes repeating a token less likely")
    g.add_argument("--stop", action="append", default=[], type=text("the text to stop at"),
                   help="stop when this text appears (repeatable)")
    g.add_argument("--num-samples", type=whole_number(1), default=1, help="continuations per prompt")
    g.add_argument("--batch-size", type=whole_number(1), default=32,
                   help="most sequences generated (each sample of a prompt is one), texts classified or --lm-eval"
                        " requests scored at once:"
                        " a longer --prompt-file runs in batches, so memory does not grow with its length")
    g.add_argument("--seed", type=whole_number(0, 2**63 - 1), help="same seed, same samples")
    g = p.add_argument_group("evaluate: how good is the model on a file (same formats as training)")
    g.add_argument("--eval", metavar="FILE", type=text("a data file"),
                   help="report loss and perplexity (LM) or accuracy, per-label scores and confusion (classifier)")
    g.add_argument("--text-column", default="text", type=text("a column name"),
                   help="text field of .jsonl/.csv/.tsv files")
    g.add_argument("--label-column", default="label", type=text("a column name"),
                   help="label field of .jsonl/.csv/.tsv files")
    g.add_argument("--stride", type=whole_number(1),
                   help="LM: texts longer than the context are read in overlapping windows this many tokens apart"
                        " (default and most: the context less one)")
    g.add_argument("--top-losses", type=whole_number(0), default=5, metavar="K",
                   help="classifier: show the K examples it got most confidently wrong")
    g.add_argument("--plot", metavar="PNG", type=text("a file name"),
                   help="classifier: draw the confusion matrix into this PNG (needs matplotlib)")
    g.add_argument("--compare", action="store_true",
                   help="with --quantize: the full-precision model beside the quantized one, and each"
                        " quantized layer's error")
    g.add_argument("--json", action="store_true", help="print the results of --eval or --explain as one JSON object")
    g = p.add_argument_group("lm-eval: scores people compare (EleutherAI's lm-evaluation-harness, pip install lm-eval)")
    g.add_argument("--lm-eval", metavar="TASKS", type=text("task names or a task path"),
                   help="comma-separated lm-eval task names (hellaswag,arc_easy) or paths to a task YAML or folder"
                        " (data/lm_eval); the results JSON goes beside the model")
    g.add_argument("--limit", type=number(0, low_open=True),
                   help="--lm-eval: only the first N examples of each task (below 1: that share of them)")
    g.add_argument("--num-fewshot", type=whole_number(0), help="--lm-eval: solved examples shown before each one")
    g = p.add_argument_group("explain: why the model said that")
    g.add_argument("--explain", action="store_true",
                   help="classifier: integrated gradients for each token; LM: each step's candidates, filter by filter")
    g.add_argument("--ig-steps", type=whole_number(1), default=32,
                   help="integrated gradients: points on the path from the baseline")
    g.add_argument("--ig-baseline", choices=["pad", "zero"], default="pad",
                   help="integrated gradients: every token replaced by padding, or zero embeddings")
    g.add_argument("--show-attention", action="store_true",
                   help="classifier: also the last layer's [CLS] attention, per head")
    g.add_argument("--explain-top", type=whole_number(1), default=5,
                   metavar="N", help="LM: candidates shown at each stage")
    g = p.add_argument_group("serve and export")
    g.add_argument("--serve", action="store_true",
                   help="serve the model over HTTP in the OpenAI API's format (/v1/completions, /v1/classify)")
    g.add_argument("--host", default="127.0.0.1", type=text("a host name or address"),
                   help="--serve: the address to listen on (0.0.0.0: every network)")
    g.add_argument("--port", type=whole_number(0, 65535), default=8000, help="--serve: the port (0: any free one)")
    g.add_argument("--api-key", type=text("a key"),
                   help="--serve: require 'Authorization: Bearer KEY' (default: $NANOTUNE_API_KEY if set)")
    g.add_argument("--max-batch", type=whole_number(1, 256), default=32,
                   help="--serve: most sequences decoded together")
    g.add_argument("--cache-budget", type=size, metavar="SIZE",
                   help="--serve: most memory the key/value cache may take, such as 2GB or 512MB (1 KB = 1024"
                        " bytes); requests wait until theirs fits (default: half the memory available at start)")
    g.add_argument("--max-connections", type=whole_number(1),
                   help="--serve: most connections open at once; the others wait to be accepted (default: half the"
                        " open-file limit, ulimit -n, at most 1000)")
    g.add_argument("--header-timeout", type=number(0, low_open=True), default=10.0, metavar="SECONDS",
                   help="--serve: a request's header must arrive within this time, else 408")
    g.add_argument("--body-timeout", type=number(0, low_open=True), default=30.0, metavar="SECONDS",
                   help="--serve: a request's body must arrive within this time of its header, else 408")
    g.add_argument("--grace-period", type=number(0), default=30.0, metavar="SECONDS",
                   help="--serve: after Ctrl-C or SIGTERM, the requests in flight have this long to finish; a second"
                        " signal stops at once")
    g.add_argument("--export-onnx", metavar="FILE", type=text("a file name"),
                   help="write the model as ONNX (adapters merged first) and check it with onnxruntime")
    g.add_argument("--export-gguf", metavar="FILE", type=text("a file name"),
                   help="write a Llama-family model as GGUF for llama.cpp and Ollama (adapters merged first),"
                        " and read it back to check it")
    g.add_argument("--gguf-type", choices=["f32", "f16", "q8_0"], default="f16",
                   help="--export-gguf: how the weight matrices are stored")
    add_plain_flag(p)
    return p


def prompt_text(value):
    """A --prompt as the shell passed it. Bytes that are not text in the locale's encoding (a Latin-1
    terminal under a UTF-8 locale) reach Python as lone surrogates, which no tokenizer can encode;
    which encoding the terminal meant cannot be known (Latin-1? cp1252? Shift-JIS?), so ask, rather
    than guess and generate from mojibake."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = value[e.start:e.end].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"byte {raw[0]:#x} at position {e.start} is not {sys.getfilesystemencoding()}"
                                         " text, the locale's encoding: set the terminal to it (or LANG to the"
                                         " terminal's), or put the prompt in a UTF-8 file for --prompt-file") from None
    return value


def parse_args(argv=None):
    return parser().parse_args(argv)
