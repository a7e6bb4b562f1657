"""Conversations: from a list of messages to one token sequence, through the model's own chat
template, and which of its tokens the loss scores.

A chat model was fine-tuned on conversations written one particular way: special tokens that open
and close each turn and name its speaker (SmolLM2 and Qwen2 use ChatML: `<|im_start|>user ...
<|im_end|>`; Llama 3 its own headers). That way is the model's chat template, a small Jinja program
shipped with the checkpoint. Training and generating must use the same one: a model that saw other
markers would not know where a question ends or when to stop answering.

The loss scores the answers only (the assistant's turns, each up to and including its end-of-turn
token, so that the model learns to stop): the questions are given, not something to learn to
write, and a model trained to predict them too spends its capacity on imitating users. Which
tokens belong to answers is found by rendering the conversation turn by turn: the text an answer
adds to the rendering is its span, and the span must begin and end on token boundaries.

The render check: an answer is trained in the context a server will give it. At serving time the
model continues the template's rendering of the earlier turns with the generation prompt; in
training, the answer sits inside the rendering of the whole conversation. The two agree only when
the template is prefix-preserving: when rendering later turns leaves the earlier ones as they were.
Qwen3's is not: it drops an earlier answer's `<think>` block (and writes the last one's, empty or
not), so a multi-turn conversation's earlier answers appear in training without the thinking the
model writes when it answers. Such answers are found turn by turn and kept as context, unscored.

Tool calls: the `tools` a conversation may use (JSON schemas, as OpenAI's API sends them) go to the
template, which writes them into the prompt; an assistant turn may carry `tool_calls` (scored like
any answer: calling a tool is something to learn), and a `tool` turn the result (given, never
scored).
"""
import contextvars
import json
import math
import re
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path

from .errors import NanotuneError
from .losses import IGNORE

ROLES = ("system", "user", "assistant", "tool")
# What a message may carry besides its role and content (OpenAI's names; reasoning_content: Qwen3's thinking).
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
# A named template for models that ship none (--chat-template chatml).
BUILT_IN = {"chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
                       " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                       "{{ '<|im_start|>assistant\n' }}{% endif %}")}


def read_template(folder, choice=None):
    """The chat template: --chat-template (a file, or a built-in name), else the checkpoint's own
    (`chat_template.jinja`, or `chat_template` in tokenizer_config.json, where a GGUF's is kept too).
    None if there is none."""
    if choice:
        if choice in BUILT_IN:
            return BUILT_IN[choice]
        path = Path(choice).expanduser()
        if not path.is_file():
            raise NanotuneError(f"--chat-template {choice}: no such file, and not a built-in name"
                                f" ({', '.join(BUILT_IN)})")
        return read_text(path, f"--chat-template {choice}")
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return read_text(folder / "chat_template.jinja", f"the chat template {folder / 'chat_template.jinja'}")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(read_text(config, str(config))).get("chat_template")
        if isinstance(template, list):       # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def read_text(path, what):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NanotuneError(f"{what} is not UTF-8 text (byte {e.object[e.start]:#x} at position {e.start}):"
                            " save it as UTF-8") from None


# A chat template is a program shipped with a checkpoint (or given by hand), and a program can loop
# for ever or write without end. Rendering one stops at these limits, far above what any real
# template needs (a few milliseconds, and the conversation plus its markers), with one clear line.
TIME_LIMIT = 5.0                  # seconds for one rendering
OUTPUT_LIMIT = 4_000_000          # characters in any one text: ~1M tokens, more than any model's context
BUILD_LIMIT = 100 * OUTPUT_LIMIT  # characters built in all by one rendering (so its memory is bounded too)
BUILT = contextvars.ContextVar("characters built by the rendering under way", default=0)


class TemplateLimit(Exception):
    """A template went past a limit (not a TypeError or LookupError, which Jinja's own code catches)."""


def checked_size(size):
    """A text (or list) of `size` about to be built: refused past the limits."""
    if size > OUTPUT_LIMIT:
        raise TemplateLimit(f"builds a text of more than {OUTPUT_LIMIT:,} characters")
    if BUILT.get() + size > BUILD_LIMIT:
        raise TemplateLimit(f"builds more than {BUILD_LIMIT:,} characters in all")
    BUILT.set(BUILT.get() + size)


def bounded_join(pieces):
    """"".join, counting as it goes: every text a template builds (its output, a macro's or a
    `{% set %}` block's, and `a ~ b`) is joined here, so none grows past OUTPUT_LIMIT."""
    joined, size = [], 0
    for piece in pieces:
        piece = str(piece)
        size += len(piece)
        if size > OUTPUT_LIMIT:
            checked_size(size)
        joined.append(piece)
    checked_size(size)
    return "".join(joined)


def compile_template(source, name="the chat template"):
    """The template compiled as transformers compiles it: Jinja in a sandbox (a template is code
    from the Hub: the sandbox keeps it from touching anything but its inputs), blocks trimmed, the
    helpers templates call (raise_exception, tojson, strftime_now), and `{% generation %}` blocks
    (which mark the answers for transformers' own mask) rendered as their contents. The sandbox
    also bounds the size of what a template builds: ranges (Jinja's MAX_RANGE), `+`, `*` and `**`,
    and every join (bounded_join)."""
    try:
        import jinja2
        from jinja2.compiler import CodeGenerator
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise NanotuneError("conversations are rendered with the model's chat template, a Jinja program:"
                            " pip install jinja2 (or the project's [chat] extra)") from None

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedCode(CodeGenerator):
        def visit_Concat(self, node, frame):          # `a ~ b ~ c` -> environment.concat((a, b, c, ))
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCode
        concat = staticmethod(bounded_join)
        intercepted_binops = frozenset(["+", "*", "**"])

        def call_binop(self, context, operator, left, right):
            """The size of a sum, a repetition or a power, checked before it is computed."""
            sized = lambda x: isinstance(x, (str, list, tuple))
            if operator == "+" and sized(left) and sized(right):
                checked_size(len(left) + len(right))
            if operator == "*" and (sized(left) or sized(right)):
                n, seq = (right, left) if sized(left) else (left, right)
                checked_size(len(seq) * n if isinstance(n, int) else 0)
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                checked_size(int(right * math.log10(abs(left))))          # its digits
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise NanotuneError(f"{name} does not compile ({e.message}, line {e.lineno}): fix it, or give"
                            " another with --chat-template") from None
    except RecursionError:
        raise NanotuneError(f"{name} nests too deeply to compile: fix it, or give another with"
                            " --chat-template") from None


def render_within_time(template, **variables):
    """template.render, stopped after TIME_LIMIT seconds: a trace function (this thread only) looks
    at the clock on every line the template runs, its loops included, and on every call it makes."""
    deadline = time.monotonic() + TIME_LIMIT

    def watch(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimit(f"runs longer than {TIME_LIMIT:g} seconds")
        return watch if frame.f_code.co_filename == "<template>" else None

    previous, built = sys.gettrace(), BUILT.set(0)
    sys.settrace(watch)
    try:
        return template.render(**variables)
    finally:
        sys.settrace(previous)
        BUILT.reset(built)


class ChatTemplate:
    """A compiled chat template and the tokenizer it writes for. `name`: where it comes from (a
    file, a built-in name), as errors say it; by default, the tokenizer's folder. `options`: the
    template's own switches, passed to every rendering (Qwen3's enable_thinking)."""

    def __init__(self, source, tokenizer, name=None, options=None):
        self.source, self.tokenizer, self.options = source, tokenizer, dict(options or {})
        where = name or getattr(tokenizer, "folder", None)
        self.name = f"the chat template {where}" if name else f"the chat template of {where}" if where else \
            "the chat template"
        self.template = compile_template(source, self.name)
        ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
        self.specials = {name: tokenizer.tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}

    def render(self, messages, add_generation_prompt=False, tools=None, options=None) -> str:
        """The conversation as text, or one line saying how the template failed: it refused the
        conversation (raise_exception), went past a limit (TIME_LIMIT, OUTPUT_LIMIT, Jinja's
        MAX_RANGE), or failed as a program (a recursion without end, a division by zero, ...)."""
        import jinja2
        try:
            return render_within_time(self.template, messages=messages, add_generation_prompt=add_generation_prompt,
                                      tools=tools or None, documents=None,
                                      **self.specials | self.options | (options or {}))
        except jinja2.TemplateError as e:
            raise NanotuneError(f"{self.name} refused a conversation ({e}): check its roles and order") from None
        except TemplateLimit as e:
            raise NanotuneError(f"{self.name} {e}, the most nanotune lets a chat template take: fix it, or give"
                                " another with --chat-template") from None
        except RecursionError:
            raise NanotuneError(f"{self.name} calls itself without end (a recursion too deep): fix it, or give"
                                " another with --chat-template") from None
        except Exception as e:        # the template is a program, and the program failed: its error, not ours
            raise NanotuneError(f"{self.name} failed ({type(e).__name__}: {e}): fix it, or give another with"
                                " --chat-template") from None

    def encode(self, messages, add_generation_prompt=False, tools=None, options=None) -> list:
        """Token ids, as transformers' apply_chat_template(tokenize=True) gives them: the rendered text
        encoded without adding special tokens (the template writes its own). `options`: the template's
        switches for this rendering only (a request's enable_thinking)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt, tools, options),
                                     add_special_tokens=False)

    def stop_ids(self) -> set:
        """The tokens that end an answer: the end-of-text token, and the template's end-of-turn token
        (the special token that closes an assistant turn when rendered)."""
        stops = {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set()
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        answer = self.render(probe)[len(self.render(probe[:1], add_generation_prompt=True)):]
        specials = self.tokenizer.special_ids()
        stops |= {i for i in self.tokenizer.encode(answer, add_special_tokens=False) if i in specials}
        return stops

    def answers(self, messages, tools=None):
        """The render check. (ids, answers): the conversation's token ids, and for each assistant turn
        (its index k, the span [first, last] of its answer in ids, and whether the span is exact). An
        answer is exact when the ids up to its end are what serving gives the model (the earlier
        turns with the generation prompt) followed by the answer as the model would write it (the
        template's rendering of turns 0..k less that prompt): then training teaches what serving asks."""
        text = self.render(messages, tools=tools)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        found = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True, tools=tools)
            through = self.render(messages[:k + 1], tools=tools)
            through = through[:len(through.rstrip())]   # the answer and its end-of-turn token, not what follows
            prompt = self.tokenizer.encode(before, add_special_tokens=False)
            turn = self.tokenizer.encode(through, add_special_tokens=False)
            exact = through.startswith(before) and turn[:len(prompt)] == prompt and ids[:len(turn)] == turn
            if exact:
                found.append((k, len(prompt), len(turn) - 1, True))
            else:                                       # where this turn's answer sits in the whole conversation
                first, last = self.span_in(text, ids, messages, k, tools)
                found.append((k, first, last, False))
        return ids, found

    def span_in(self, text, ids, messages, k, tools):
        """[first, last] token positions of answer k in the whole rendering, for one that is not exact:
        from where its prompt ends (the earlier turns with the generation prompt, or without it where
        the text does not go on that way) to its end-of-turn token; (1, 0), empty, where the earlier
        turns are not rendered as the text begins."""
        before = self.render(messages[:k], add_generation_prompt=True, tools=tools)
        earlier = before if text.startswith(before) else self.render(messages[:k], tools=tools)
        if not text.startswith(earlier):
            return 1, 0
        first, stops = len(self.tokenizer.encode(earlier, add_special_tokens=False)), self.stop_ids()
        last = next((i for i in range(first, len(ids)) if ids[i] in stops), len(ids) - 1)
        return first, last

    def tokenize(self, messages, train_on="answers", tools=None):
        """(ids, labels) of a conversation: labels are the ids on the answers' tokens (each answer's
        end-of-turn token included) and -100 elsewhere, or the ids everywhere with train_on="all".
        Answers that fail the render check (answers) are context only: their labels are -100."""
        ids, found = self.answers(messages, tools)
        return ids, scored(ids, found, train_on)


def scored(ids, found, train_on="answers"):
    """The labels of a conversation's ids: the ids where an exact answer is (ChatTemplate.answers),
    -100 elsewhere; with train_on="all", the ids everywhere."""
    if train_on == "all":
        return list(ids)
    labels = [IGNORE] * len(ids)
    for _, first, last, exact in found:
        if exact:
            labels[first:last + 1] = ids[first:last + 1]
    return labels


def check_conversation(messages, where, need_answer=True):
    """A conversation as the OpenAI API and the Hub's chat datasets write it, or one clear line: each
    message a role and its content (text; an assistant's may be null beside its tool_calls), and the
    other fields OpenAI's format has (tool_calls, tool_call_id, name) kept for the template."""
    if not isinstance(messages, list) or not messages:
        raise NanotuneError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    checked = []
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or not ("content" in message or
                                                                           message.get("tool_calls")):
            raise NanotuneError(f"{where}: message {n} is not an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise NanotuneError(f"{where}: message {n} has role {message['role']!r}; use one of {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        content = message.get("content")
        if calls is not None:
            check_tool_calls(calls, f"{where}: message {n}")
            content = "" if content is None else content          # OpenAI writes null beside tool calls
        if not isinstance(content, str):
            raise NanotuneError(f"{where}: message {n}'s content is {json.dumps(content)[:40]}, not text:"
                                " every message's content must be a string")
        checked.append({"role": message["role"], "content": content}
                       | {k: message[k] for k in MESSAGE_KEYS if message.get(k) is not None})
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise NanotuneError(f"{where}: the conversation has no assistant turn, so there is no answer to learn")
    return checked


def check_tool_calls(calls, where):
    """An assistant's tool_calls as OpenAI writes them: [{"type": "function", "function": {"name",
    "arguments"}}, ...] (arguments a JSON text or an object)."""
    for call in calls if isinstance(calls, list) else [None]:
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", {}), (str, dict)):
            raise NanotuneError(f"{where}: 'tool_calls' must be a list of {{\"type\": \"function\", \"function\":"
                                " {\"name\": ..., \"arguments\": ...}} objects")


def check_tools(tools, where):
    """A list of tool definitions (OpenAI's {"type": "function", "function": {"name", "description",
    "parameters"}}), passed to the template as they are."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise NanotuneError(f"{where}: 'tools' must be a list of tool definitions (objects such as {{\"type\":"
                            " \"function\", \"function\": {\"name\": ..., \"parameters\": ...}})")
    return tools


def read_tools(path):
    """--tools FILE: a JSON list of tool definitions, for every conversation that has none of its own."""
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise NanotuneError(f"--tools {path}: no such file: give a JSON file holding a list of tool definitions")
    try:
        tools = json.loads(read_text(path, f"--tools {path}"))
    except json.JSONDecodeError as e:
        raise NanotuneError(f"--tools {path} is not valid JSON ({e.msg}, line {e.lineno}): give a JSON list of tool"
                            " definitions") from None
    return check_tools(tools, f"--tools {path}")


def template_options(source, thinking):
    """The template's own switches: --enable-thinking on|off sets Qwen3's enable_thinking (off: the
    generation prompt ends with an empty <think></think> block, so the model answers at once).
    None leaves the template's default. A template without that switch is refused."""
    if thinking is None:
        return {}
    if "enable_thinking" not in source:
        raise NanotuneError(f"--enable-thinking {thinking}: this chat template has no enable_thinking switch"
                            " (Qwen3's has): leave the flag out")
    return {"enable_thinking": thinking == "on"}


TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text):
    """(content, tool_calls) of a generated answer: the calls a model wrote in its template's format
    (Qwen3's and Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), as OpenAI's
    tool_calls (arguments as a JSON text), and the text around them; ([], the text) when it wrote none,
    or wrote one that is not JSON with a name."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            return text, []
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return text, []
        arguments = call.get("arguments", {})
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": call["name"],
                                   "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
    return (TOOL_CALL.sub("", text).strip() if calls else text), calls


def render_conversations(train_examples, val_examples, tokenizer, model_name, choice=None, train_on="answers",
                         tools=None, thinking=None):
    """Conversations become text through the model's own chat template (the one it was fine-tuned
    with: the markers it knows), or `choice` (--chat-template); each conversation's rendering is
    its text in the data report, and its (ids, labels) after the render check. `tools`: --tools's
    list, for the conversations without their own. Returns the template; None for plain text."""
    chats = [bool(examples) and "messages" in examples[0] for examples in (train_examples, val_examples)]
    if not chats[0]:
        if choice or train_on != "answers" or tools or thinking:
            raise NanotuneError("--chat-template, --train-on, --tools and --enable-thinking apply to conversations"
                                " (.jsonl with messages, conversations, instruction and output, or prompt and"
                                " completion), and this data is plain text: leave them out")
        return None
    if val_examples and not chats[1]:
        raise NanotuneError("the training data are conversations and the validation data are not: give"
                            " --val-data in the same format")
    tokenizer.chat_template = read_template(None, choice) if choice else tokenizer.chat_template
    if tokenizer.chat_template is None:
        raise NanotuneError(f"{model_name} has no chat template to write conversations with: give one with"
                            " --chat-template FILE, or --chat-template chatml")
    template = ChatTemplate(tokenizer.chat_template, tokenizer, choice,
                            template_options(tokenizer.chat_template, thinking))
    for example in train_examples + val_examples:
        example["tools"] = example.get("tools") or tools
        example["text"] = template.render(example["messages"], tools=example["tools"])
        ids, found = template.answers(example["messages"], example["tools"])
        example["tokens"] = ids, scored(ids, found, train_on)
        example["affected"] = [(first, last) for _, first, last, exact in found if not exact]
    affected = [e for e in train_examples + val_examples if e["affected"]]
    if train_on == "strict" and affected:
        turns = sum(len(e["affected"]) for e in affected)
        first = affected[0].get("where", "?")
        raise NanotuneError(f"{turns} assistant turns in {len(affected)} conversations (the first: {first})"
                            " are rendered differently in training than at serving time (the chat template changes"
                            " earlier turns, as Qwen3's drops their <think> blocks): --train-on answers trains"
                            " the exact ones only, --train-on all every token, --train-on strict refuses")
    return template
