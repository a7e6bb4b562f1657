"""The server keeps model work and anything that grows faster than the text off its event loop:
each token's text is decoded from a short window, not from every prefix; classification runs in
batches of --max-batch in a worker thread, so /health is answered while it runs."""
import threading

import torch
from test_serve import request

from nanotune import GPT2, BertClassifier, load_tokenizer


def plain_pieces(ids, tokenizer):
    """Each token's share of the text, the textbook way: decode every prefix, keep what is new;
    a token that leaves half a character holds its text back for the token that completes it."""
    texts, done = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[:i + 1])
        if text.endswith("\ufffd"):
            texts.append("")
            continue
        texts.append(text[len(done):])
        done = text
    if texts:
        texts[-1] += tokenizer.decode(ids)[len(done):]
    return texts


def test_the_text_grown_token_by_token_equals_decoding_every_prefix(tiny_gpt2, tiny_llama):
    from nanotune.tools.engine import Detokenizer
    for folder in (tiny_gpt2, tiny_llama):
        tok = load_tokenizer(folder)
        written = tok.encode("naïve café, 日本語 and 🙂 🙂, ½ — done.\nNext line:  two  spaces")
        drawn = torch.randint(0, len(tok.tokenizer.get_vocab()), (300,), generator=torch.Generator().manual_seed(0))
        for ids in (written, drawn.tolist()):
            d = Detokenizer(tok)
            pieces = [d.add(t) for t in ids]
            pieces[-1] += d.held
            assert pieces == plain_pieces(ids, tok)
            assert "".join(pieces) == tok.decode(ids)


class CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.inner, self.decoded = tokenizer, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.inner.decode(ids, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_engine_decodes_each_token_a_bounded_number_of_times(tiny_gpt2):
    from nanotune.tools import openai_api as api
    from nanotune.tools.engine import Engine, Request
    model = GPT2.from_pretrained(tiny_gpt2)
    tok = CountingTokenizer(load_tokenizer(tiny_gpt2))
    done = threading.Event()
    settings = {"max_tokens": 60, "temperature": 1.0, "top_p": 1.0, "n": 1, "stop": ["zzz"], "seed": 1, "logprobs": 2}
    work = Request([tok.encode("Why")], settings, lambda kind, s: kind == "done" and done.set())
    engine = Engine(model, tok, 4, set())
    engine.submit(work)
    assert done.wait(120)
    engine.stop()
    s = work.sequences[0]
    answer = api.logprobs(s, tok)
    assert "".join(answer["tokens"]) == s.text == tok.inner.decode(s.tokens)
    assert answer["text_offset"] == [len("".join(answer["tokens"][:i])) for i in range(60)]
    # a window of a few tokens each step, and the alternatives' one each: linear in the length
    assert tok.decoded <= 10 * 60 + 2 * 60, tok.decoded      # every prefix: 60 * 61 / 2 = 1,830


class Gated(torch.nn.Module):
    """A classifier whose forward pass waits until the test opens the gate: a "long" forward pass
    that takes no time on a shared machine."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.batches = model, model.config, []
        self.entered, self.gate = threading.Event(), threading.Event()

    def forward(self, ids, mask):
        self.batches.append(len(ids))
        self.entered.set()
        assert self.gate.wait(60)
        return self.model(ids, mask)


def test_health_is_answered_while_a_classification_runs(tiny_bert):
    import socket

    import uvicorn

    from nanotune.tools.serve import app
    model = Gated(BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]))
    application, _ = app(model, load_tokenizer(tiny_bert), "clf", max_batch=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning"))
    running = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    running.start()
    port, result = sock.getsockname()[1], {}
    try:
        texts = [f"review {i}: the soup was cold" for i in range(10)]
        asking = threading.Thread(target=lambda: result.update(answer=request(port, "POST", "/v1/classify",
                                                                              {"input": texts}, key=None)))
        asking.start()
        assert model.entered.wait(60)                  # the first forward pass has begun, and waits
        assert request(port, "GET", "/health", key=None) == (200, {"status": "ok"})   # before: no answer
        model.gate.set()
        asking.join()
        status, answer = result["answer"]
        assert status == 200 and [d["index"] for d in answer["data"]] == list(range(10))
        assert model.batches == [4, 4, 2]                                              # --max-batch 4
        alone = request(port, "POST", "/v1/classify", {"input": texts[9]}, key=None)[1]["data"][0]
        assert all(abs(alone["probabilities"][k] - v) < 1e-5 for k, v in answer["data"][9]["probabilities"].items())
    finally:
        model.gate.set()
        server.should_exit = True
        running.join(60)
