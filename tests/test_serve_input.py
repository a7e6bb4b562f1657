"""generate.py --serve refuses odd but valid JSON with an OpenAI error object and a whole sentence:
seeds near 2^63, lone surrogates, a non-boolean stream, a prompt longer than the context."""
import signal

import pytest
from test_serve import request, start_server


@pytest.fixture(scope="module")
def server(tiny_gpt2, tiny_bert, tmp_path_factory):
    from nanotune import BertClassifier, load_tokenizer
    folder = tmp_path_factory.mktemp("clf")
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(folder)
    load_tokenizer(tiny_bert).save(folder)
    procs = [start_server(tiny_gpt2), start_server(folder)]
    yield procs[0][1], procs[1][1]
    for proc, _ in procs:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def error_of(status, answer):
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return status, answer["error"]["message"]


@pytest.mark.parametrize("seed", [2**62, 2**63 - 1])
def test_a_seed_near_the_top_of_its_range_samples_the_same_twice(server, seed):
    lm, _ = server
    body = {"prompt": "Why", "max_tokens": 8, "temperature": 1.0, "seed": seed}
    first, second = request(lm, "POST", "/v1/completions", body), request(lm, "POST", "/v1/completions", body)
    assert first[0] == 200, first
    assert first[1]["choices"][0]["text"] == second[1]["choices"][0]["text"]


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", b'{"prompt": "Hi \\ud800 there"}'),
    ("/v1/completions", b'{"prompt": ["fine", "\\udfff"]}'),
    ("classify", b'{"input": ["fine", "bad \\ud83d"]}'),
])
def test_a_lone_surrogate_is_a_400_with_an_error_object(server, route, body):
    lm, clf = server
    port, path = (clf, "/v1/classify") if route == "classify" else (lm, route)
    status, message = error_of(*request(port, "POST", path, raw=body))
    assert status == 400 and "surrogate" in message, message


def test_stream_must_be_a_boolean_and_the_message_says_so(server):
    status, message = error_of(*request(server[0], "POST", "/v1/completions", {"prompt": "Hi", "stream": "yes"}))
    assert status == 400 and message.endswith("true or false"), message


def test_a_prompt_longer_than_the_context_is_told_so(server):
    status, message = error_of(*request(server[0], "POST", "/v1/completions", {"prompt": list(range(80))}))
    assert status == 400 and "80 tokens" in message and "64" in message and "or less" not in message, message
    status, message = error_of(*request(server[0], "POST", "/v1/completions", {"prompt": list(range(64))}))
    assert status == 400 and "64 tokens" in message and "or less" not in message, message
