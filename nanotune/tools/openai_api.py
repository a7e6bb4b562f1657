"""The OpenAI API's wire format, for the server: requests checked field by field (types, ranges,
sizes) with OpenAI-style error objects, and responses and stream chunks in the shapes the `openai`
client reads, for /v1/completions and /v1/chat/completions."""
import itertools
import json
import secrets
import time

from ..chat import check_conversation, parse_tool_calls
from ..errors import NanotuneError

MAX_N = 16                       # choices per prompt
MAX_PROMPTS = 256                # prompts per request


class RequestError(Exception):
    """Something wrong with a request: sent back as an OpenAI-style error object."""

    def __init__(self, status, message, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self):
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def field(body, name, types, default, check=None, allowed=""):
    """body[name], checked: of one of `types` (bool never counts as a number) and passing `check`."""
    value = body.get(name, default)
    if value is None:
        return default
    kinds = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in kinds)
    if not ok or (check is not None and not check(value)):
        raise RequestError(400, f"{name!r} is {json.dumps(value)[:60]}: it must be {allowed}", param=name)
    return value


def settings(body, default_max_tokens, chat=False):
    """The sampling settings both endpoints share."""
    stops_ok = lambda v: v != "" if isinstance(v, str) else len(v) <= 4 and all(isinstance(s, str) and s for s in v)
    stop = field(body, "stop", (str, list), [], stops_ok, "a non-empty string or a list of up to 4 non-empty strings")
    if chat and body.get("max_completion_tokens") is not None:            # the chat API's newer name
        body = body | {"max_tokens": body["max_completion_tokens"]}
    tools = bool(body.get("tools")) if chat else False                     # answers may hold tool calls
    s = {"max_tokens": field(body, "max_tokens", int, default_max_tokens, lambda v: v >= 0, "a whole number >= 1"),
         "temperature": field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
         "top_p": field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
         "n": field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"a whole number from 1 to {MAX_N}"),
         "stop": [stop] if isinstance(stop, str) else stop,
         "seed": field(body, "seed", int, None, lambda v: 0 <= v < 2**63, "a whole number >= 0"),
         "stream": field(body, "stream", bool, False, allowed="true or false"),
         "logprobs": None, "tools": tools, "echo": False}
    if not chat:
        s["logprobs"] = field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "a whole number from 0 to 5")
        s["echo"] = field(body, "echo", bool, False, allowed="true or false")
        field(body, "best_of", int, 1, lambda v: v == 1, "1 (best_of is not supported)")
    if s["max_tokens"] == 0 and not s["echo"]:          # nothing to write and nothing to show
        raise RequestError(400, "'max_tokens' is 0: it must be a whole number >= 1 (0 only with 'echo', to score"
                                " the prompt)", param="max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        field(body, name, (int, float), 0, lambda v: v == 0, "0 (penalties are not supported)")
    if s["stream"] and s["logprobs"] is not None:
        raise RequestError(400, "'logprobs' is not supported with 'stream'", param="logprobs")
    if s["stream"] and s["echo"]:
        raise RequestError(400, "'echo' is not supported with 'stream'", param="echo")
    return s


def completion_prompts(body, tokenizer, vocab_size):
    """The prompts of a /v1/completions request, as token ids: a string, a list of strings, token
    ids, or a list of lists of token ids."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        prompts = [prompt]                       # one prompt as token ids
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and all(type(t) is int for t in p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise RequestError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(400, f"'prompt' lists {len(prompts)} prompts; the most is {MAX_PROMPTS}", param="prompt")
    ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if any(not 0 <= t < vocab_size for p in ids for t in p):
        raise RequestError(400, f"'prompt' has token ids outside 0..{vocab_size - 1}", param="prompt")
    return [p or [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id] for p in ids]


def chat_prompt(body, template):
    """The conversation of a /v1/chat/completions request, written by the model's chat template and
    ending where the assistant's answer begins: its messages (tool calls and tool results too), its
    `tools`, and the template's switch `enable_thinking` (also as `chat_template_kwargs`, as vLLM
    takes it)."""
    if template is None:
        raise RequestError(400, "this model has no chat template: use POST /v1/completions, or start the server"
                                " with --chat-template")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {\"role\", \"content\"} objects",
                           param="messages")
    try:
        messages = check_conversation(messages, "'messages'", need_answer=False)
    except NanotuneError as e:
        raise RequestError(400, str(e), param="messages") from None
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError(400, "'tools' must be a list of tool definitions ({\"type\": \"function\","
                                " \"function\": {...}})", param="tools")
    kwargs = field(body, "chat_template_kwargs", dict, {}, lambda v: set(v) <= {"enable_thinking"},
                   "an object whose only key is enable_thinking")
    thinking = field(body, "enable_thinking", bool, kwargs.get("enable_thinking"), allowed="true or false")
    if thinking is not None and not isinstance(thinking, bool):
        raise RequestError(400, "'chat_template_kwargs.enable_thinking' must be true or false",
                           param="chat_template_kwargs")
    if thinking is not None and "enable_thinking" not in template.source:
        raise RequestError(400, "this model's chat template has no enable_thinking switch (Qwen3's has): leave it"
                                " out", param="enable_thinking")
    try:
        return template.encode(messages, add_generation_prompt=True, tools=tools,
                               options=None if thinking is None else {"enable_thinking": thinking})
    except Exception as e:                      # the template refused the conversation (raise_exception)
        raise RequestError(400, f"the chat template refused these messages ({e})", param="messages") from None


def chat_message(text, tools):
    """The assistant's message: with `tools` in the request, the calls the model wrote in its
    template's format (chat.parse_tool_calls) become OpenAI's tool_calls."""
    content, calls = parse_tool_calls(text) if tools else (text, [])
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": content or None, "tool_calls": calls}


def check_size(prompts, s, context, max_batch):
    """Within the model's context, and no more sequences than the engine decodes at once."""
    if len(prompts) * s["n"] > max_batch:
        raise RequestError(400, f"this request asks for {len(prompts) * s['n']} sequences ({len(prompts)} prompts x n"
                                f" {s['n']}); the server decodes at most {max_batch} at once (--max-batch): send fewer"
                                " prompts or a smaller n", param="n")
    longest = max(map(len, prompts))
    if longest + min(s["max_tokens"], 1) > context:      # (echo with max_tokens 0 may score a whole context)
        raise RequestError(400, f"the prompt is {longest} tokens long; this model's context is {context} tokens, and"
                                " the prompt must leave room for at least one new token: shorten it",
                           param="prompt", code="context_length_exceeded")
    if longest + s["max_tokens"] > context:
        raise RequestError(400, f"this model's context is {context} tokens; the prompt has {longest} and 'max_tokens'"
                                f" asks for {s['max_tokens']} more: lower 'max_tokens' to {max(context - longest, 0)}"
                                " or less", param="max_tokens", code="context_length_exceeded")


# ---- responses ------------------------------------------------------------------------------------

def new_id(chat):
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), int(time.time())


def usage(request):
    n = request.settings["n"]
    prompt_tokens = sum(len(s.prompt) for s in request.sequences[::n])
    completion_tokens = sum(len(s.tokens) for s in request.sequences)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(s):
    return "length" if s.finish_reason == "length" else "stop"


def response(request, model_id, chat, request_id, created, tokenizer):
    """The whole answer, once every choice has ended."""
    if chat:
        messages = [chat_message(s.text, request.settings["tools"]) for s in request.sequences]
        choices = [{"index": s.index, "message": m, "logprobs": None,
                    "finish_reason": "tool_calls" if "tool_calls" in m else finish_reason(s)}
                   for s, m in zip(request.sequences, messages)]
    else:
        choices = [{"text": s.prompt_text + s.text if s.request.settings["echo"] else s.text, "index": s.index,
                    "logprobs": logprobs(s, tokenizer),
                    "finish_reason": finish_reason(s)} for s in request.sequences]
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model_id, "choices": choices, "usage": usage(request)}


def chunk(model_id, chat, request_id, created, index, text, finish=None, first=False, calls=()):
    """A server-sent event's data: a piece of one choice's text, or its end; `calls`: a chat
    answer's tool calls (sent whole, once the answer has ended)."""
    if chat:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        delta |= {"tool_calls": [{"index": i} | c for i, c in enumerate(calls)]} if calls else {}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model_id, "choices": [choice]}


def logprobs(s, tokenizer):
    """OpenAI's logprobs object for a completion: each token's text, its log-probability and the
    likeliest alternatives, and where each token's text starts. Each token's share of the text
    comes from the engine (a token that is half a character gets "", the one completing it the
    character): the shares join to the text."""
    if s.request.settings["logprobs"] is None:
        return None
    kept = s.logprobs[:len(s.tokens)]
    tokens = s.pieces[:len(kept)]
    if tokens:                                   # what is still held at the end belongs to the last token
        tokens[-1] += s.decoded.held
    if s.request.settings.get("echo"):
        # the prompt's own tokens first, each scored given those before it (the first has nothing before
        # it: null), then the completion's, then the end-of-text token that ended it, if one did, with no
        # text: lm-eval's local-completions takes the last entry for the new token and drops it
        ended = s.logprobs[len(kept):]
        tokens = s.prompt_pieces + tokens + [""] * len(ended)
        kept = [None, *s.prompt_logprobs, *kept, *ended]
    return {"tokens": tokens, "token_logprobs": [None if e is None else e[1] for e in kept],
            "top_logprobs": [None if e is None else alternatives(e[2], tokenizer) for e in kept],
            "text_offset": [0, *itertools.accumulate(map(len, tokens[:-1]))] if tokens else []}


def alternatives(top, tokenizer):
    """{text: log-probability} of the likeliest tokens; a token that is half a character, or that
    reads like another, is shown as the vocabulary's own symbol."""
    shown = {}
    for i, value in top:
        text = tokenizer.decode([i], skip_special_tokens=False)
        if "\ufffd" in text or text in shown:
            text = tokenizer.tokenizer.id_to_token(i)
        shown[text] = value
    return shown
