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
"""
import json
from datetime import datetime
from pathlib import Path

from .errors import NanotuneError
from .losses import IGNORE

ROLES = ("system", "user", "assistant")
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
        return path.read_text(encoding="utf-8")
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):       # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def compile_template(source):
    """The template compiled as transformers compiles it: Jinja in a sandbox (a template is code
    from the Hub: the sandbox keeps it from touching anything but its inputs), blocks trimmed, the
    helpers templates call (raise_exception, tojson, strftime_now), and `{% generation %}` blocks
    (which mark the answers for transformers' own mask) rendered as their contents."""
    try:
        import jinja2
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

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise NanotuneError(f"the chat template does not compile ({e.message}, line {e.lineno}): fix it, or give"
                            " another with --chat-template") from None


class ChatTemplate:
    """A compiled chat template and the tokenizer it writes for."""

    def __init__(self, source, tokenizer):
        self.source, self.tokenizer = source, tokenizer
        self.template = compile_template(source)
        ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
        self.specials = {name: tokenizer.tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}

    def render(self, messages, add_generation_prompt=False) -> str:
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                        documents=None, **self.specials)
        except jinja2.TemplateError as e:
            raise NanotuneError(f"the chat template refused a conversation ({e}): check its roles and order") from None

    def encode(self, messages, add_generation_prompt=False) -> list:
        """Token ids, as transformers' apply_chat_template(tokenize=True) gives them: the rendered text
        encoded without adding special tokens (the template writes its own)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt), add_special_tokens=False)

    def stop_ids(self) -> set:
        """The tokens that end an answer: the end-of-text token, and the template's end-of-turn token
        (the special token that closes an assistant turn when rendered)."""
        stops = {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set()
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        answer = self.render(probe)[len(self.render(probe[:1], add_generation_prompt=True)):]
        specials = self.tokenizer.special_ids()
        stops |= {i for i in self.tokenizer.encode(answer, add_special_tokens=False) if i in specials}
        return stops

    def tokenize(self, messages, train_on="answers"):
        """(ids, labels) of a conversation: labels are the ids on the answers' tokens (each answer's
        end-of-turn token included) and -100 elsewhere, or the ids everywhere with train_on="all"."""
        text = self.render(messages)
        encoding = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        ids = encoding.ids
        if train_on == "all":
            return ids, list(ids)
        labels = [IGNORE] * len(ids)
        starts = {start: i for i, (start, _) in enumerate(encoding.offsets)}
        ends = {end: i for i, (_, end) in enumerate(encoding.offsets)}
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=True)
            through = self.render(messages[:k + 1])
            if not (text.startswith(before) and text.startswith(through)):
                raise NanotuneError("the chat template does not render a conversation turn by turn (a later turn"
                                    " changes an earlier one), so its answers cannot be found: give another with"
                                    " --chat-template, or train on every token with --train-on all")
            end = len(through.rstrip())                 # the answer and its end-of-turn token, not what follows
            first, last = starts.get(len(before)), ends.get(end)
            if first is None or last is None:
                raise NanotuneError(f"an answer does not start and end on token boundaries ({text[len(before):end]!r}):"
                                    " the chat template and the tokenizer do not fit; train with --train-on all")
            labels[first:last + 1] = ids[first:last + 1]
        return ids, labels


def check_conversation(messages, where):
    """A conversation as the OpenAI API and the Hub's chat datasets write it, or one clear line."""
    if not isinstance(messages, list) or not messages:
        raise NanotuneError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    for n, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise NanotuneError(f"{where}: message {n} is not an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise NanotuneError(f"{where}: message {n} has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise NanotuneError(f"{where}: message {n}'s content is {json.dumps(message['content'])[:40]}, not text:"
                                " every message's content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise NanotuneError(f"{where}: the conversation has no assistant turn, so there is no answer to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render_conversations(train_examples, val_examples, tokenizer, model_name, choice=None, train_on="answers"):
    """Conversations become text through the model's own chat template (the one it was fine-tuned
    with: the markers it knows), or `choice` (--chat-template); each conversation's rendering is
    its text in the data report. Returns the template; None for plain text."""
    chats = [bool(examples) and "messages" in examples[0] for examples in (train_examples, val_examples)]
    if not chats[0]:
        if choice or train_on != "answers":
            raise NanotuneError("--chat-template and --train-on apply to conversations (.jsonl with messages, or"
                                " prompt and completion), and this data is plain text: leave them out")
        return None
    if val_examples and not chats[1]:
        raise NanotuneError("the training data are conversations and the validation data are not: give"
                            " --val-data in the same format")
    tokenizer.chat_template = read_template(None, choice) if choice else tokenizer.chat_template
    if tokenizer.chat_template is None:
        raise NanotuneError(f"{model_name} has no chat template to write conversations with: give one with"
                            " --chat-template FILE, or --chat-template chatml")
    template = ChatTemplate(tokenizer.chat_template, tokenizer)
    for example in train_examples + val_examples:
        example["text"] = template.render(example["messages"])
    return template
