"""The serving engine keeps its key/value cache within a budget (--cache-budget): a sequence is
admitted only while the cache, with room for every admitted prompt and its max_tokens, fits; the
others wait; one that could never fit is refused; and the cache is freed when the engine is idle."""
import signal
import threading
import time

from test_serve import request, start_server

from nanotune import GPT2, load_tokenizer


def test_sequences_wait_for_room_in_the_budget_and_the_cache_is_freed_when_idle(tiny_gpt2):
    from nanotune.tools.engine import Engine, Request
    model, tok = GPT2.from_pretrained(tiny_gpt2), load_tokenizer(tiny_gpt2)
    prompt = tok.encode("Once upon a time")
    settings = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 4, "stop": [], "seed": None, "logprobs": None}
    results = {}
    for budget in (None, 2):
        engine = Engine(model, tok, 8, set())
        if budget is not None:
            engine.budget = budget = 2 * (len(prompt) + 12) * engine.position_bytes     # room for two sequences
        most, held, done = [0], [0], threading.Event()

        def emit(kind, seq):
            most[0] = max(most[0], len(engine.running))
            held[0] = max(held[0], 2 * engine.k.numel() * engine.k.element_size())
            if kind == "done" and all(s.finish_reason for s in work.sequences):
                done.set()
        work = Request([prompt], settings, emit)
        engine.submit(work)
        assert done.wait(120)
        results[budget is None] = [s.tokens for s in work.sequences], most[0], held[0]
        deadline = time.monotonic() + 30
        while engine.k.numel() and time.monotonic() < deadline:     # idle: the cache goes back
            time.sleep(0.01)
        assert engine.k.numel() == 0 and engine.v.numel() == 0
        engine.stop()
    (free, free_most, _), (kept, kept_most, kept_held) = results[True], results[False]
    assert kept == free and len(kept) == 4                     # the same answers, later
    assert free_most == 4 and kept_most == 2, (free_most, kept_most)
    assert kept_held <= budget, (kept_held, budget)


def test_the_server_prints_its_budget_and_refuses_a_request_that_could_never_fit(tiny_gpt2):
    proc, port = start_server(tiny_gpt2, "--cache-budget", "16KB")     # 32 positions of this model's cache
    try:
        printed = proc.stdout.readline() + proc.stdout.readline()
        assert "key/value cache: at most 16.0 KB" in printed, printed
        status, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 40})
        assert status == 400 and "--cache-budget" in answer["error"]["message"], answer
        status, answer = request(port, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 8, "n": 4})
        assert status == 200 and len(answer["choices"]) == 4       # three fit at once: the fourth waited
        assert request(port, "GET", "/health", key=None) == (200, {"status": "ok"})
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
