"""/v1/completions with echo and logprobs: the prompt's own tokens scored, as OpenAI's legacy API
returned them, so that lm-eval's `local-completions` model scores a served model; its numbers are
the adapter's (nanotune/tools/lm_eval.py) on the same model."""
import signal
import threading

import pytest
import torch
from conftest import make_llama
from test_serve import KEY, request, start_server

from nanotune import load_tokenizer
from nanotune.models import load_model

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from test_lm_eval import REQUESTS, hub_folder, task_requests  # noqa: E402

from nanotune.tools.lm_eval import as_lm  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory, bpe_dir):
    folder = hub_folder(make_llama(tmp_path_factory.mktemp("served-llama"), bpe_dir))
    proc, port = start_server(folder)
    yield port, folder
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)


def test_local_completions_equals_the_adapter(served, monkeypatch):
    """lm-eval itself, through the server: the same log-likelihoods (and greedy flags) as the adapter."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)                  # lm-eval sends it as the bearer token
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    port, folder = served
    remote = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{port}/v1/completions", model=str(folder),
                                 tokenizer=str(folder), tokenizer_backend="huggingface", batch_size=4,
                                 max_length=128, max_retries=1)
    requests = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(REQUESTS)]
    requests += task_requests(["nanotune_jokes"], limit=3)
    ours = as_lm(load_model(folder), load_tokenizer(folder), batch_size=4)
    got, want = remote.loglikelihood(requests, disable_tqdm=True), ours.loglikelihood(requests)
    assert len(got) == len(requests) == 16
    for (a, greedy_a), (b, greedy_b) in zip(got, want):
        assert abs(a - b) < 1e-4 and greedy_a == greedy_b


def test_echo_scores_the_prompt(served):
    port, folder = served
    tok, model = load_tokenizer(folder), load_model(folder)
    prompt = "The soup was cold, and naïve."
    ids = tok.encode(prompt)
    status, body = request(port, "POST", "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2,
                                                             "max_tokens": 0})
    assert status == 200, body
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == "".join(lp["tokens"]) == tok.decode(ids)
    assert len(lp["tokens"]) == len(ids) and body["usage"]["completion_tokens"] == 0
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(ids))]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.inference_mode():                     # position t predicts token t+1
        want = model(torch.tensor([ids])).float().log_softmax(-1)[0, :-1].gather(-1, torch.tensor(ids[1:])[:, None])
    assert lp["token_logprobs"][1:] == pytest.approx(want[:, 0].tolist(), abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= value
               for top, value in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    # one new token: the prompt's entries, then the new token's; the text is the prompt's and the new one
    status, body = request(port, "POST", "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1,
                                                             "max_tokens": 1, "temperature": 0})
    one = body["choices"][0]
    assert one["logprobs"]["token_logprobs"][:-1] == lp["token_logprobs"]
    assert len(one["logprobs"]["tokens"]) == len(ids) + 1 and one["text"].startswith(choice["text"])
    status, body = request(port, "POST", "/v1/completions", {"prompt": prompt, "echo": True, "max_tokens": 2})
    assert status == 200 and body["choices"][0]["text"].startswith(choice["text"])
    assert body["choices"][0]["logprobs"] is None


def test_echo_refusals(served):
    port, _ = served
    for body, param in [({"prompt": "Why", "max_tokens": 0}, "max_tokens"),           # 0 only to score a prompt
                        ({"prompt": "Why", "echo": True, "stream": True}, "echo"),
                        ({"prompt": "Why", "echo": "yes"}, "echo"),
                        ({"prompt": "Why", "echo": True, "max_tokens": -1}, "max_tokens"),
                        ({"prompt": "word " * 200, "echo": True, "logprobs": 1, "max_tokens": 0}, "prompt")]:
        status, answer = request(port, "POST", "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == param, (body, answer)


def test_echo_in_chunks_equals_echo_at_once(tiny_llama, monkeypatch):
    """A long prompt's logits are made a few positions at a time: the same numbers as all at once."""
    from nanotune.tools import engine as engine_module
    from nanotune.tools import openai_api as api
    model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
    ids = tok.encode("My grandfather kept a jar of buttons on the shelf by the door.")
    answers = []
    for chunk in (3, 256):
        monkeypatch.setattr(engine_module, "CHUNK", chunk)
        done = threading.Event()
        settings = {"max_tokens": 0, "temperature": 1.0, "top_p": 1.0, "n": 1, "stop": [], "seed": 1,
                    "logprobs": 3, "echo": True}
        work = engine_module.Request([ids], settings, lambda kind, s: kind == "done" and done.set())
        engine = engine_module.Engine(model, tok, 4, set())
        engine.submit(work)
        assert done.wait(120)
        engine.stop()
        answers.append(api.logprobs(work.sequences[0], tok))
    assert len(answers[0]["token_logprobs"]) == len(ids)
    assert answers[0]["token_logprobs"][1:] == pytest.approx(answers[1]["token_logprobs"][1:], abs=1e-6)
    assert answers[0]["tokens"] == answers[1]["tokens"]
