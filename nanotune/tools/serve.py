"""Serve a model over HTTP in the OpenAI API's wire format, so that existing clients work unchanged.

    POST /v1/completions        a language model: prompt (a string or a list), max_tokens, temperature,
                                top_p, n, stop, seed, stream, logprobs, echo (the prompt scored too;
                                max_tokens 0 with echo: the prompt scored only; lm-eval's local-completions reads it)
    POST /v1/chat/completions   a chat model: messages, through the model's chat template; the same settings,
                                tools (answers' tool calls returned as tool_calls) and enable_thinking
    POST /v1/classify           a classifier: {"input": "text" or ["text", ...]} -> {"data": [{"index": 0,
                                "label": "positive", "probabilities": {...}}, ...], "usage": {...}}
    POST /v1/score              a reward model (train.py --reward-model): {"input": {"prompt": ..., "answer": ...}
                                or a list of them} -> {"data": [{"index": 0, "score": 1.25}, ...]}
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok"} while the server takes requests

The requests' sequences are decoded together by engine.py (continuous batching). The HTTP itself is
uvicorn and Starlette (the `serve` extra): keep-alive, chunked bodies, server-sent events; its
limits for slow or hostile clients and the grace period on shutdown are http_server.py's; here
only the routes, the API key and the checks on every body (size, JSON, fields, valid Unicode) are
nanotune's. Nothing slow runs on the event loop: the engine decodes in its own thread, and a
classifier's forward passes run in a worker thread.
"""
import asyncio
import json
import secrets
import signal
import socket
import time

import torch

from .. import preference
from ..errors import NanotuneError
from ..run.memory import free_memory
from . import openai_api as api
from .engine import Engine, Request
from .http_server import Limits, Server, open_file_limit

MAX_BODY = 1 << 20               # bytes of JSON a request may send


def check_installed():
    import importlib.util
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise NanotuneError(f"--serve needs {' and '.join(missing)}: pip install {' '.join(missing)} (or the"
                            " project's [serve] extra)")


def app(model, tokenizer, model_id, api_key=None, max_batch=32, template=None, continuous=True, cache_budget=None):
    """The Starlette application, and its engine (None for a classifier). cache_budget: bytes the
    key/value cache may take (None: no limit)."""
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
    is_lm = hasattr(model, "lm_head")
    stops = (template.stop_ids() if template else {tokenizer.eos_id}) - {None}
    engine = Engine(model, tokenizer, max_batch, stops, continuous, cache_budget) if is_lm else None
    started, classifying = int(time.time()), asyncio.Lock()
    card = {"id": model_id, "object": "model", "created": started, "owned_by": "nanotune"}

    def error(e):
        return JSONResponse(e.body(), status_code=e.status)

    def authorised(request):
        given = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise api.RequestError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                                   code="invalid_api_key")

    async def read_json(request):
        """The body as a JSON object, at most MAX_BODY bytes however it is sent."""
        given = request.headers.get("content-length")
        if given is not None and not given.isdigit():
            raise api.RequestError(400, f"Content-Length {given!r} is not a whole number of bytes")
        if given is not None and int(given) > MAX_BODY:
            raise api.RequestError(413, f"the body is {int(given):,} bytes; the limit is {MAX_BODY:,}",
                                   code="request_too_large")
        pieces, size = [], 0
        try:
            async for piece in request.stream():
                pieces.append(piece)
                size += len(piece)
                if size > MAX_BODY:
                    raise api.RequestError(413, f"the body is over the limit of {MAX_BODY:,} bytes",
                                           code="request_too_large")
        except ClientDisconnect:                        # gone, or closed by a time limit (http_server.py)
            raise api.RequestError(499, "the client went away before its body was in") from None
        raw = b"".join(pieces)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.RequestError(400, f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise api.RequestError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise api.RequestError(400, "the body must be a JSON object")
        try:                  # JSON's \ud800 escapes can make a lone surrogate, which no tokenizer (or UTF-8) takes
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise api.RequestError(400, "a string in the body holds a lone UTF-16 surrogate (such as \\ud800),"
                                        " which is not a character: send valid Unicode") from None
        if body.get("model") not in (None, model_id):
            raise api.RequestError(404, f"model {body['model']!r} is not served here; this server serves {model_id!r}",
                                   param="model", code="model_not_found")
        return body

    def route(handler):
        async def endpoint(request):
            try:
                authorised(request)
                return await handler(request)
            except api.RequestError as e:
                return error(e)
        return endpoint

    async def models(request):
        return JSONResponse({"object": "list", "data": [card]})

    async def one_model(request):
        if request.path_params["name"] != model_id:
            raise api.RequestError(404, f"no model {request.path_params['name']!r} here", code="model_not_found")
        return JSONResponse(card)

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def completions(request, chat=False):
        if not is_lm:
            raise api.RequestError(400, "this model is a classifier: use POST /v1/classify")
        body = await read_json(request)
        if chat:
            prompts = [api.chat_prompt(body, template)]
            s = api.settings(body, max(1, min(256, model.config.context - len(prompts[0]))), chat=True)
        else:
            prompts = api.completion_prompts(body, tokenizer, model.config.vocab_size)
            s = api.settings(body, 16)
        api.check_size(prompts, s, model.config.context, max_batch)
        positions = max(map(len, prompts)) + s["max_tokens"]
        needs = positions * engine.position_bytes
        if needs > engine.budget:                                      # it could never start: say so now
            most = engine.budget // engine.position_bytes - (positions - s["max_tokens"])
            raise api.RequestError(400, f"a sequence of this request needs {size_text(needs)}"
                                        f" of key/value cache ({positions} positions), more than the server's budget"
                                        f" of {size_text(engine.budget)} (--cache-budget): "
                                        + (f"lower 'max_tokens' to {int(most)} or less" if most >= 1
                                           else "send a shorter prompt"), param="max_tokens",
                                   code="cache_budget_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(kind, seq):                            # from the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, seq))
            except RuntimeError:                        # the loop has closed: the server stopped, no one waits
                work.cancelled = True
        work = Request(prompts, s, emit)
        engine.submit(work)
        request_id, created = api.new_id(chat)
        if s["stream"]:
            return StreamingResponse(stream(work, events, chat, request_id, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        left = len(work.sequences)
        while left:
            kind, payload = await next_event(events, request, work)
            if kind == "error":
                raise api.RequestError(500, payload, kind="server_error")
            left -= kind == "done"
        answer = await asyncio.to_thread(api.response, work, model_id, chat, request_id, created, tokenizer)
        return JSONResponse(answer)                    # (built in a thread: logprobs decode every alternative)

    async def next_event(events, request, work):
        """The engine's next event; a client that went away cancels its sequences (their places free up)."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    work.cancelled = True
                    raise api.RequestError(499, "the client went away") from None

    async def stream(work, events, chat, request_id, created):
        """Server-sent events: pieces of each choice's text as they are decoded, each choice's end,
        then [DONE]. Text that might be the start of a stop string, or half a character, waits."""
        hold = max((len(x) - 1 for x in work.settings["stop"]), default=0)
        sent = {s.index: 0 for s in work.sequences}
        send = lambda *a, **k: f"data: {json.dumps(api.chunk(model_id, chat, request_id, created, *a, **k))}\n\n"
        try:
            if chat:
                for s in work.sequences:
                    yield send(s.index, "", first=True)
            left = len(work.sequences)
            while left:
                kind, s = await events.get()
                if kind == "error":
                    yield f"data: {json.dumps(api.RequestError(500, s, kind='server_error').body())}\n\n"
                    break
                done = kind == "done"
                if chat and work.settings["tools"]:   # tool calls are parsed from the whole answer: it goes at the end
                    if done:
                        left -= 1
                        message = api.chat_message(s.text, True)
                        calls = message.get("tool_calls", ())
                        yield send(s.index, message["content"] or "", calls=calls)
                        yield send(s.index, "", finish="tool_calls" if calls else api.finish_reason(s))
                    continue
                ready = s.text if done or s.finish_reason else s.text[:len(s.text) - hold]
                if (done or not ready.endswith("\ufffd")) and len(ready) > sent[s.index]:
                    yield send(s.index, ready[sent[s.index]:])
                    sent[s.index] = len(ready)
                if done:
                    left -= 1
                    yield send(s.index, "", finish=api.finish_reason(s))
            yield "data: [DONE]\n\n"
        finally:                                   # also when the client disconnects mid-stream
            work.cancelled = True

    async def classify(request):
        if is_lm:
            raise api.RequestError(400, "this model generates text: use POST /v1/completions")
        texts = (await read_json(request)).get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if (not isinstance(texts, list) or not texts or len(texts) > 256
                or not all(isinstance(t, str) and t.strip() for t in texts)):
            raise api.RequestError(400, "'input' must be a non-empty string or a list of 1 to 256 non-empty strings",
                                   param="input")
        async with classifying:                         # one request's batches at a time, each in a worker thread
            probs, tokens = [], 0
            for start in range(0, len(texts), max_batch):
                p, n = await asyncio.to_thread(classify_batch, texts[start:start + max_batch])
                probs.append(p)
                tokens += n
        labels = model.config.labels
        data = [{"index": i, "label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist()))}
                for i, p in enumerate(torch.cat(probs))]
        return JSONResponse({"object": "list", "model": model_id, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def classify_batch(texts):
        """Up to --max-batch texts through the classifier, off the event loop: (probabilities, tokens)."""
        ids, mask = tokenizer(texts, max_length=model.config.max_position_embeddings)
        with torch.inference_mode():
            return model(ids, mask).float().softmax(-1), int(mask.sum())

    async def score(request):
        """A reward model's scores: {"input": {"prompt", "answer"} or a list of them} -> one score each."""
        if not hasattr(model, "score"):
            raise api.RequestError(400, "this model is not a reward model (train.py --reward-model): use POST"
                                        f" {'/v1/completions' if is_lm else '/v1/classify'}")
        rows = (await read_json(request)).get("input")
        rows = [rows] if isinstance(rows, dict) else rows
        if not isinstance(rows, list) or not 1 <= len(rows) <= 256 or not all(isinstance(r, dict) for r in rows):
            raise api.RequestError(400, "'input' must be a {\"prompt\", \"answer\"} object or a list of 1 to 256 of"
                                        " them", param="input")
        async with classifying:                         # in a worker thread, one request at a time
            try:
                values = await asyncio.to_thread(preference.score_answers, model, tokenizer, rows, max_batch)
            except NanotuneError as e:
                raise api.RequestError(400, str(e), param="input") from None
        return JSONResponse({"object": "list", "model": model_id,
                             "data": [{"index": i, "score": v} for i, v in enumerate(values)]})

    async def not_found(request, exc):
        return error(api.RequestError(404, f"no route {request.method} {request.url.path}: this server has GET"
                                           " /v1/models and /health, POST /v1/completions, /v1/chat/completions and"
                                           " /v1/classify", code="not_found"))

    routes = [Route("/health", health), Route("/v1/models", route(models)),
              Route("/v1/models/{name:path}", route(one_model)),
              Route("/v1/completions", route(completions), methods=["POST"]),
              Route("/v1/chat/completions", route(lambda r: completions(r, chat=True)), methods=["POST"]),
              Route("/v1/classify", route(classify), methods=["POST"]),
              Route("/v1/score", route(score), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found}), engine


def serve(model, tokenizer, model_id, host, port, api_key, flags, template=None):
    """Serve until Ctrl-C (or SIGTERM); then finish the requests in flight within the grace period
    and return. `flags`: generate.py's, for --max-batch and the limits of http_server.py."""
    import uvicorn
    limits = Limits(flags.header_timeout, flags.body_timeout, flags.max_connections or 0, flags.grace_period)
    if limits.max_connections > open_file_limit() - 64:
        raise NanotuneError(f"--max-connections {limits.max_connections} would leave too few of the process's"
                            f" {open_file_limit()} open files (ulimit -n) for everything else: lower it, or raise"
                            " the limit")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)                                     # connections wait from now on, even before uvicorn runs
    except OSError as e:
        sock.close()
        raise NanotuneError(f"cannot listen on {host}:{port} ({e.strerror or e}): another program may be using the"
                            " port; choose another --port, or --port 0 for any free one") from None
    budget = flags.cache_budget
    if budget is None and hasattr(model, "lm_head"):
        free = free_memory(model.lm_head.weight.device)
        budget = free // 2 if free else None
    application, engine = app(model, tokenizer, model_id, api_key, flags.max_batch, template, cache_budget=budget)
    bound = sock.getsockname()
    print(f"serving {model_id} on http://{bound[0]}:{bound[1]}/v1 ({'completions' if engine else 'classify'};"
          f" {'an API key is required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    print(f"limits: {limits.max_connections} connections open at once (--max-connections), a request's header"
          f" within {limits.header_timeout:g} s and its body within {limits.body_timeout:g} s (--header-timeout,"
          f" --body-timeout), {limits.grace_period:g} s to finish after Ctrl-C or SIGTERM (--grace-period)",
          flush=True)
    if engine is not None:
        print(f"key/value cache: at most {size_text(budget) if budget else 'no limit'} at once ("
              + ("--cache-budget" if flags.cache_budget else "half the memory available now; --cache-budget changes it")
              + "); requests wait for room, one that could never fit is refused", flush=True)
    server = Server(uvicorn.Config(application, log_level="warning"), limits)
    previous = signal.signal(signal.SIGTERM, _interrupt)        # uvicorn raises it again once it has finished
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if engine is not None:
            engine.stop(cancel=True)                          # what is left has no one waiting for it
    if server.cut_short:
        print(f"stopped: {server.cut_short} request(s) still in flight after the grace period were cut off",
              flush=True)
    else:
        print("stopped: every request in flight was answered", flush=True)
    return 0


def size_text(n):
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def _interrupt(signum, frame):
    raise KeyboardInterrupt
