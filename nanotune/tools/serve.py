"""Serve a model over HTTP in the OpenAI API's wire format, so that existing clients work unchanged.

    POST /v1/completions   a language model: prompt (a string or a list), max_tokens, temperature,
                           top_p, n, stop, seed, stream, logprobs; the OpenAI response shape
    POST /v1/classify      a classifier: {"input": "text" or ["text", ...]} ->
                           {"object": "list", "model": ..., "data": [{"index": 0, "label": "positive",
                            "probabilities": {"negative": 0.02, "positive": 0.98}}, ...],
                            "usage": {"prompt_tokens": N, "total_tokens": N}}
    GET  /v1/models        the one model served

Requests that arrive together are decoded together: one worker thread takes every waiting
request and runs them as one batch through generation.generate (left padding, each sequence
stopping on its own), so throughput grows with the number of clients. Standard library only.
"""
import json
import queue
import secrets
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from ..errors import NanotuneError
from ..generation import generate

MAX_BODY = 1 << 20               # bytes of JSON a request may send
MAX_N = 16                       # choices per prompt
MAX_BATCH = 32                   # sequences decoded together
GATHER = 0.01                    # seconds the worker waits for more requests before it starts a batch


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


class Choice:
    """One sequence being decoded for a request: its text so far, where it ends and why."""

    def __init__(self, request, index, prompt_ids, max_tokens):
        self.request, self.index, self.prompt_ids, self.max_tokens = request, index, prompt_ids, max_tokens
        self.text, self.sent, self.tokens, self.finish_reason = "", 0, [], None


class Completion:
    """A request to /v1/completions, with the queue its choices' text goes to while streaming."""

    def __init__(self, body, prompts, settings):
        self.body, self.settings = body, settings
        self.choices = [Choice(self, i * settings["n"] + j, ids, settings["max_tokens"])
                        for i, ids in enumerate(prompts) for j in range(settings["n"])]
        self.events = queue.Queue()                  # ("delta", choice) ..., then ("done", None) or ("error", message)
        self.cancelled = False                       # the client went away: stop decoding its choices

    def batch_key(self):
        """Requests decoded together share their sampling settings; a seeded one is decoded alone,
        so that its random numbers, and so its text, do not depend on who else was waiting."""
        s = self.settings
        return ("seed", id(self)) if s["seed"] is not None else (s["temperature"], s["top_p"])


class Engine:
    """The model, its tokenizer, and the one worker thread that decodes batches."""

    def __init__(self, model, tokenizer, model_id, max_batch=MAX_BATCH):
        self.model, self.tokenizer, self.model_id, self.max_batch = model, tokenizer, model_id, max_batch
        self.is_lm = hasattr(model, "lm_head")
        self.device = next(model.parameters()).device
        self.waiting = queue.Queue()
        self.lock = threading.Lock()                 # one forward pass at a time (classification)
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="nanotune-decoder", daemon=True)
        self.worker.start()

    # ---- completions ---------------------------------------------------------------------------
    def parse_completion(self, body):
        context = self.model.config.context
        prompt = body.get("prompt", "<|endoftext|>")
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
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for p in ids for t in p):
            raise RequestError(400, f"'prompt' has token ids outside 0..{vocab - 1}", param="prompt")
        ids = [p or [self.tokenizer.bos_id] for p in ids]
        stops_ok = lambda v: v != "" if isinstance(v, str) else len(v) <= 4 and all(isinstance(s, str) and s for s in v)
        stop = field(body, "stop", (str, list), [], stops_ok,
                     "a non-empty string or a list of up to 4 non-empty strings")
        settings = {
            "max_tokens": field(body, "max_tokens", int, 16, lambda v: v >= 1, "a whole number >= 1"),
            "temperature": field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number from 0 to 2"),
            "top_p": field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]"),
            "n": field(body, "n", int, 1, lambda v: 1 <= v <= MAX_N, f"a whole number from 1 to {MAX_N}"),
            "stop": [stop] if isinstance(stop, str) else stop,
            "seed": field(body, "seed", int, None, lambda v: 0 <= v < 2**63, "a whole number >= 0"),
            "stream": field(body, "stream", bool, False),
            "logprobs": field(body, "logprobs", int, None, lambda v: 0 <= v <= 5, "a whole number from 0 to 5"),
        }
        field(body, "echo", bool, False, lambda v: not v, "false (echo is not supported)")
        field(body, "best_of", int, 1, lambda v: v == 1, "1 (best_of is not supported)")
        for name in ("presence_penalty", "frequency_penalty"):
            field(body, name, (int, float), 0, lambda v: v == 0, "0 (penalties are not supported)")
        if settings["stream"] and settings["logprobs"] is not None:
            raise RequestError(400, "'logprobs' is not supported with 'stream'", param="logprobs")
        if len(ids) * settings["n"] > self.max_batch:
            raise RequestError(400, f"this request asks for {len(ids) * settings['n']} sequences ({len(ids)}"
                                    f" prompts x n {settings['n']}); the server decodes at most"
                                    f" {self.max_batch} at once (--max-batch): send fewer prompts or a"
                                    " smaller n",
                               param="n")
        longest = max(map(len, ids))
        if longest + settings["max_tokens"] > context:
            raise RequestError(400, f"this model's context is {context} tokens; the prompt has {longest} and"
                                    f" 'max_tokens' asks for {settings['max_tokens']} more: lower"
                                    f" 'max_tokens' to {max(context - longest, 0)} or less",
                               param="max_tokens", code="context_length_exceeded")
        return Completion(body, ids, settings)

    def submit(self, completion):
        if self.stopping:
            raise RequestError(503, "the server is shutting down", kind="server_error")
        self.waiting.put(completion)
        return completion

    def _work(self):
        while True:
            first = self.waiting.get()
            if first is None:
                return
            taken = [first]
            deadline = time.monotonic() + GATHER
            while sum(len(c.choices) for c in taken) < self.max_batch:
                try:                         # requests sent together arrive a few milliseconds apart
                    nxt = self.waiting.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.waiting.put(None)
                    break
                taken.append(nxt)
            groups = {}
            for c in taken:
                groups.setdefault(c.batch_key(), []).append(c)
            for group in groups.values():
                try:
                    self._decode(group)
                except Exception as e:      # a bug must not take the server down for everyone else
                    for c in group:
                        c.events.put(("error", f"{type(e).__name__}: {e}"))

    def _decode(self, requests):
        choices = [ch for r in requests for ch in r.choices]
        s = requests[0].settings
        stops = {id(ch): ch.request.settings["stop"] for ch in choices}
        eos = self.tokenizer.eos_id

        def on_token(i, new_ids):
            ch = choices[i]
            if ch.request.cancelled:
                ch.finish_reason = "cancelled"
                return True
            text = self.tokenizer.decode(new_ids)
            cut = min((text.find(x) for x in stops[id(ch)] if x in text), default=-1)
            ch.tokens = list(new_ids)
            if cut >= 0:
                ch.text, ch.finish_reason = text[:cut], "stop"
            else:
                ch.text = text
                if len(new_ids) >= ch.max_tokens:
                    ch.finish_reason = "length"
            if ch.request.settings["stream"]:
                ch.request.events.put(("delta", ch))
            return ch.finish_reason is not None

        logprobs = {}

        def on_step(logits, seen, tokens):
            for i, ch in enumerate(choices):
                k = ch.request.settings["logprobs"]
                if k is None or ch.finish_reason is not None:
                    continue
                lp = logits[i].float().log_softmax(-1)
                alternatives = {}
                for v, t in zip(*lp.topk(k)) if k else ():
                    text = self.tokenizer.decode([int(t)], skip_special_tokens=False)
                    if "\ufffd" in text or text in alternatives:     # half a character, or a clash: the raw token
                        text = self.tokenizer.tokenizer.id_to_token(int(t))
                    alternatives[text] = float(v)
                logprobs.setdefault(i, []).append((int(tokens[i]), float(lp[tokens[i]]), alternatives))
        generator = torch.Generator(self.device).manual_seed(s["seed"]) if s["seed"] is not None else None
        want_logprobs = any(r.settings["logprobs"] is not None for r in requests)
        with self.lock:
            generate(self.model, [ch.prompt_ids for ch in choices], max(ch.max_tokens for ch in choices),
                     self.tokenizer.pad_id, eos, s["temperature"], None, s["top_p"], 1.0, generator, on_token=on_token,
                     on_step=on_step if want_logprobs else None)
        for i, ch in enumerate(choices):
            if ch.finish_reason is None:             # ended at the end-of-text token
                ch.finish_reason = "stop"
            ch.logprobs = logprobs.get(i, [])[:len(ch.tokens)] if ch.request.settings["logprobs"] is not None else None
        for r in requests:
            r.events.put(("done", None))

    # ---- responses -----------------------------------------------------------------------------
    def completion_response(self, completion, request_id, created):
        choices = []
        for ch in completion.choices:
            item = {"text": ch.text, "index": ch.index, "logprobs": None, "finish_reason": ch.finish_reason}
            if ch.logprobs is not None:
                tokens = self.token_texts([t for t, _, _ in ch.logprobs])
                offsets = [sum(map(len, tokens[:i])) for i in range(len(tokens))]
                item["logprobs"] = {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in ch.logprobs],
                                    "top_logprobs": [top for _, _, top in ch.logprobs], "text_offset": offsets}
            choices.append(item)
        prompt_tokens = sum(len(ch.prompt_ids) for ch in completion.choices[::completion.settings["n"]])
        completion_tokens = sum(len(ch.tokens) for ch in completion.choices)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_id,
                "choices": choices, "usage": usage}

    def token_texts(self, ids):
        """Each token's share of the decoded text: they join to the text. A token that is half of a
        character (byte-level BPE splits some) gets "" and the token that completes it the character."""
        texts, done = [], ""
        for i in range(len(ids)):
            text = self.tokenizer.decode(ids[:i + 1])
            if text.endswith("\ufffd"):
                texts.append("")
                continue
            texts.append(text[len(done):])
            done = text
        if texts:                                    # what is still held at the end belongs to the last token
            texts[-1] += self.tokenizer.decode(ids)[len(done):]
        return texts

    # ---- classification ------------------------------------------------------------------------
    def classify(self, body):
        texts = body.get("input")
        if isinstance(texts, str):
            texts = [texts]
        if (not isinstance(texts, list) or not texts or len(texts) > 256
                or not all(isinstance(t, str) and t.strip() for t in texts)):
            raise RequestError(400, "'input' must be a non-empty string or a list of 1 to 256 non-empty"
                                    " strings", param="input")
        ids, mask = self.tokenizer(texts, max_length=self.model.config.max_position_embeddings)
        with self.lock, torch.inference_mode():
            probs = self.model(ids.to(self.device), mask.to(self.device)).float().softmax(-1).cpu()
        labels = self.model.config.labels
        data = [{"index": i, "label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist()))}
                for i, p in enumerate(probs)]
        tokens = int(mask.sum())
        return {"object": "list", "model": self.model_id, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def stop(self):
        self.stopping = True
        self.waiting.put(None)
        self.worker.join()


class Handler(BaseHTTPRequestHandler):
    server_version = "nanotune"
    protocol_version = "HTTP/1.1"
    timeout = 120                                # a client that stops sending mid-request is dropped

    def handle_one_request(self):
        # Between requests a kept-alive connection waits here; shutting down closes it (see Server).
        if self.server.closing:
            self.close_connection = True
            return
        self.server.idle.add(self.connection)
        try:
            super().handle_one_request()
        finally:
            self.server.idle.discard(self.connection)

    def parse_request(self):
        self.server.idle.discard(self.connection)    # a request has arrived: busy until answered
        return super().parse_request()

    def log_message(self, fmt, *args):           # one line per request, on stderr, as http.server does
        if self.server.verbose:
            super().log_message(fmt, *args)

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def fail(self, error):
        try:
            self.send_json(error.status, error.body())
        except OSError:                           # the client has gone
            pass

    def authorised(self):
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        if secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return True
        self.fail(RequestError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                               code="invalid_api_key"))
        return False

    def do_GET(self):
        if not self.authorised():
            return
        engine = self.server.engine
        card = {"id": engine.model_id, "object": "model", "created": self.server.started, "owned_by": "nanotune"}
        if self.path.rstrip("/") == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [card]})
        if self.path.rstrip("/") == f"/v1/models/{engine.model_id}":
            return self.send_json(200, card)
        self.fail(RequestError(404, f"no route GET {self.path}: this server has GET /v1/models", code="not_found"))

    def discard_body(self, length):
        """Read a too-large body and throw it away, so the client, still sending, gets the 413
        answer rather than a broken connection; a very large one is cut off instead."""
        if length > 16 * MAX_BODY:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:                       # the client gave up
                break
            length -= len(chunk)

    def read_body(self):
        given = self.headers.get("Content-Length")
        if given is None or self.headers.get("Transfer-Encoding"):
            self.close_connection = True         # the body was not read: it must not be taken for the next request
            raise RequestError(411, "send the JSON body with a Content-Length header (chunked bodies are not accepted)")
        if not given.strip().isdigit():
            self.close_connection = True
            raise RequestError(400, f"Content-Length {given!r} is not a whole number of bytes")
        length = int(given)
        if length > MAX_BODY:
            self.discard_body(length)
            raise RequestError(413, f"the body is {length:,} bytes; the limit is {MAX_BODY:,}",
                               code="request_too_large")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise RequestError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.server.engine.model_id:
            raise RequestError(404, f"model {model!r} is not served here; this server serves"
                                    f" {self.server.engine.model_id!r}",
                               param="model", code="model_not_found")
        return body

    def do_POST(self):
        engine = self.server.engine
        try:
            if not self.authorised():
                return
            route = self.path.rstrip("/")
            if route not in ("/v1/completions", "/v1/classify"):
                raise RequestError(404, f"no route POST {self.path}: this server has POST /v1/completions and"
                                        " /v1/classify", code="not_found")
            body = self.read_body()
            if route == "/v1/classify":
                if engine.is_lm:
                    raise RequestError(400, "this model generates text: use POST /v1/completions")
                return self.send_json(200, engine.classify(body))
            if not engine.is_lm:
                raise RequestError(400, "this model is a classifier: use POST /v1/classify")
            completion = engine.submit(engine.parse_completion(body))
        except RequestError as e:
            return self.fail(e)
        request_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if completion.settings["stream"]:
            return self.stream(completion, request_id, created)
        while True:
            kind, payload = completion.events.get()
            if kind == "done":
                return self.send_json(200, engine.completion_response(completion, request_id, created))
            if kind == "error":
                return self.fail(RequestError(500, payload, kind="server_error"))

    def stream(self, completion, request_id, created):
        """Server-sent events: a chunk for each piece of new text, one with each choice's finish
        reason, then `data: [DONE]`. Text that might be the start of a stop string, or half of a
        character split across tokens, is held back until it is certain."""
        engine = self.server.engine
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        hold = max((len(s) - 1 for s in completion.settings["stop"]), default=0)

        def send(choice_index, text, finish_reason=None):
            choice = {"text": text, "index": choice_index, "logprobs": None, "finish_reason": finish_reason}
            chunk = {"id": request_id, "object": "text_completion", "created": created, "model": engine.model_id,
                     "choices": [choice]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        try:
            while True:
                kind, ch = completion.events.get()
                if kind == "error":
                    self.wfile.write("data:"
                                     f" {json.dumps(RequestError(500, ch, kind='server_error').body())}\n\n".encode())
                    break
                if kind == "done":
                    for c in completion.choices:
                        send(c.index, c.text[c.sent:], c.finish_reason)
                    self.wfile.write(b"data: [DONE]\n\n")
                    break
                ready = ch.text if ch.finish_reason else ch.text[:len(ch.text) - hold]
                if ready.endswith("\ufffd"):
                    continue
                if len(ready) > ch.sent:
                    send(ch.index, ready[ch.sent:])
                    ch.sent = len(ready)
            self.wfile.flush()
        except OSError:                              # the client disconnected mid-stream: stop its choices
            completion.cancelled = True


class Server(ThreadingHTTPServer):
    daemon_threads = False                           # on shutdown, wait for the requests in flight
    block_on_close = True

    def __init__(self, address, engine, api_key=None, verbose=False):
        self.engine, self.api_key, self.verbose, self.started = engine, api_key, verbose, int(time.time())
        self.idle = set()                            # connections kept alive, waiting for their next request
        self.closing = False
        super().__init__(address, Handler)          # binds: fails here if the port is taken

    def server_close(self):
        """Stop listening, close the idle kept-alive connections, and wait for the requests in flight."""
        self.closing = True
        self.socket.close()
        for connection in list(self.idle):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model, tokenizer, model_id, host="127.0.0.1", port=8000, api_key=None, max_batch=MAX_BATCH, verbose=True):
    """Serve until Ctrl-C (or SIGTERM); then finish the requests in flight and return."""
    engine = Engine(model, tokenizer, model_id, max_batch)
    try:
        server = Server((host, port), engine, api_key, verbose)
    except OSError as e:
        engine.stop()
        raise NanotuneError(f"cannot listen on {host}:{port} ({e.strerror or e}): another program may be using the"
                            " port; choose another --port, or --port 0 for any free one") from None
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving {model_id} on http://{server.server_address[0]}:{server.server_address[1]}/v1"
          f" ({'completions' if engine.is_lm else 'classify'};"
          f" {'an API key is required' if api_key else 'no API key'}); Ctrl-C stops",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping: finishing the requests in flight", flush=True)
    finally:
        server.server_close()                    # waits for the handler threads, which wait for their batches
        engine.stop()
    return 0
