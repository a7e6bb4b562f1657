"""The task of learning from rewards: the prompts (a .jsonl file) and the reward functions
(`--reward FILE.py:function`, loaded by path and called on every completion).

A reward function is plain Python that a user writes: `score(prompt, completion, **fields) -> float`,
where `prompt` is the data row's prompt as written (a string or a list of messages), `completion`
the model's answer as text, and `fields` the row's other fields (the right answer, for example).
Several functions add up, each times its --reward-weights weight. Everything that can be checked
before training is: the file, the function, its signature; a reward that is not a finite number
stops the run with the prompt that produced it (no NaN ever reaches a gradient).
"""
import importlib.util
import inspect
import json
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path

from .chat import ChatTemplate, read_template
from .data import _text_lines, find_data_file, split
from .errors import NanotuneError
from .generation import generate
from .models import model_config
from .tokenizer import load_tokenizer


def read_prompts(name):
    """The rows of a .jsonl file of prompts: {"prompt": a string or a list of messages, other fields...}."""
    path = find_data_file(name)
    if path.suffix.lower() != ".jsonl":
        raise NanotuneError(f"--data {name}: learning from rewards reads .jsonl prompts, one"
                            ' {"prompt": ..., other fields} object a line')
    rows = []
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NanotuneError(f"{path} line {number} is not valid JSON ({e.msg}): one JSON object a line") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        messages = isinstance(prompt, list) and prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                               and isinstance(m.get("content"), str) for m in prompt)
        if not (isinstance(prompt, str) and prompt.strip()) and not messages:
            raise NanotuneError(f"{path} line {number} has no \"prompt\" (a string, or a list of"
                                ' {"role", "content"} messages): every line needs one')
        rows.append(row)
    return rows


def load_reward(spec, fields=()):
    """The function `spec` names ("path/to/file.py:function"), checked to take (prompt, completion,
    **fields) for a row with these `fields`."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise NanotuneError(f"--reward {spec}: give FILE.py:FUNCTION, e.g. data/arithmetic_reward.py:score")
    file = Path(path).expanduser()
    if not file.is_file():
        raise NanotuneError(f"--reward {spec}: no such file {file}; give the path of a Python file")
    module_spec = importlib.util.spec_from_file_location(f"nanotune_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(file.resolve().parent))          # so the file may import its neighbours
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise NanotuneError(f"--reward {spec}: {file} line {e.lineno} is not valid Python ({e.msg})") from None
    finally:
        sys.path.remove(str(file.resolve().parent))
    function = getattr(module, name, None)
    if not callable(function):
        defined = sorted(n for n, f in vars(module).items()
                         if inspect.isfunction(f) and f.__module__ == module.__name__)
        raise NanotuneError(f"--reward {spec}: {file} defines no function {name!r}"
                            f" (it defines: {', '.join(defined) or 'none'})")
    try:
        inspect.signature(function).bind("prompt", "completion", **dict.fromkeys(fields))
    except TypeError:
        raise NanotuneError(f"--reward {spec}: {name} must take (prompt, completion, **fields), the row's other"
                            f" fields ({', '.join(fields) or 'none'}) as keywords: define it as"
                            f" def {name}(prompt, completion, **fields)") from None
    except ValueError:                                      # a builtin without a signature: it is called as it is
        pass
    function.spec = spec
    return function


def score(functions, weights, rows, completions):
    """The weighted sum of every function's reward for each completion (rows[i] is completion i's
    data row), and each function's rewards on their own (for the log)."""
    each = []
    for function in functions:
        rewards = []
        for row, completion in zip(rows, completions):
            fields = {k: v for k, v in row.items() if k != "prompt"}
            value = function(row["prompt"], completion, **fields)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):      # True counts as 1
                prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
                raise NanotuneError(f"--reward {function.spec} returned {value!r} for the prompt {prompt[:60]!r}:"
                                    " a reward must be a finite number")
            rewards.append(float(value))
        each.append(rewards)
    total = [sum(w * r[i] for w, r in zip(weights, each)) for i in range(len(completions))]
    return total, each


@dataclass
class Task:
    """What a run learns from: the prompts as rows and as token ids, the reward functions and their
    weights, the tokenizer and the tokens that end an answer."""
    rows: list
    prompts: list
    val_rows: list
    val_prompts: list
    functions: list
    weights: list
    tokenizer: object
    stops: set
    max_new_tokens: int

    @property
    def held_out(self):
        n = len(self.val_prompts) or min(8, len(self.prompts))
        return f"{n} held-out prompts" if self.val_prompts else f"the first {n} training prompts"

    def held_out_reward(self, model):
        """The mean reward of the model's most likely answers (greedy: no luck involved) to the
        held-out prompts (or, without any, the first few training prompts)."""
        prompts, rows = (self.val_prompts, self.val_rows) if self.val_prompts else (self.prompts[:8], self.rows[:8])
        answers = generate(model, prompts, self.max_new_tokens, self.tokenizer.pad_id, self.stops, temperature=0)
        rewards = score(self.functions, self.weights, rows, [self.tokenizer.decode(a) for a in answers])[0]
        return sum(rewards) / len(rewards)


def read_task(args, run):
    """The prompts (--data; held out: --val-data or --val-split), the reward functions (--reward,
    --reward-weights) and the tokenizer, every one checked: before the model is loaded."""
    if run.task != "lm" or run.world > 1:
        raise NanotuneError("--reward trains a language model in one process: give a GPT-2 or Llama-family"
                            " --model, and run without torchrun")
    rows = [row for name in args.data for row in read_prompts(name)]
    rows, val_rows = ((rows, read_prompts(args.val_data)) if args.val_data else
                      split(rows, args.val_split, args.seed) if args.val_split > 0 else (rows, []))
    functions = [load_reward(spec, sorted(rows[0].keys() - {"prompt"})) for spec in args.reward]
    weights = args.reward_weights or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise NanotuneError(f"--reward-weights gives {len(weights)} weights for {len(functions)} --reward"
                            " functions: give one each")
    tokenizer = load_tokenizer(args.model)
    source = read_template(None, args.chat_template) if args.chat_template else tokenizer.chat_template
    template = ChatTemplate(source, tokenizer) if source else None      # a chat model: its own way to write turns
    context = model_config(args.model)
    context = context.get("n_positions") or context["max_position_embeddings"]
    prompts, val_prompts = (encode_prompts(r, tokenizer, template, context, args) for r in (rows, val_rows))
    stops = template.stop_ids() if template else {tokenizer.eos_id}     # a chat model also stops at its end of turn
    return Task(rows, prompts, val_rows, val_prompts, functions, weights, tokenizer, stops, args.max_new_tokens)


def encode_prompts(rows, tokenizer, template, context, args):
    """Each row's prompt as token ids: a user's message (or the messages given) through the chat
    template, ready for the answer; plain text for a model without one. Each must leave room for
    --max-new-tokens in the model's context."""
    encoded = []
    for row in rows:
        prompt = row["prompt"]
        if template:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = template.encode(messages, add_generation_prompt=True)
        elif isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            raise NanotuneError(f"{args.model} has no chat template to write the prompts' messages with: give one"
                                " with --chat-template, or write each prompt as text")
        if len(ids) + args.max_new_tokens > context:
            raise NanotuneError(f"the prompt {str(prompt)[:40]!r} is {len(ids)} tokens, which leaves no room for"
                                f" --max-new-tokens {args.max_new_tokens} in the model's {context} positions:"
                                " shorten it, or lower --max-new-tokens")
        encoded.append(ids)
    return encoded
