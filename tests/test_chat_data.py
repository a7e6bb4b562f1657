"""Chat data beyond `messages`: ShareGPT and Alpaca files read as conversations (and back), tool
definitions, tool calls and tool results (calls scored, results never), the render check on Qwen3's
own template (earlier answers with thinking flagged, ChatML never), --train-on strict, --show-batch's
marks and --enable-thinking; and a model trained to call a tool calls it through --chat and the
server's tool_calls."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, ROOT, make_llama, run_cli

from nanotune import load_tokenizer
from nanotune.chat import BUILT_IN, ChatTemplate, check_conversation, parse_tool_calls, render_conversations
from nanotune.data import SHAREGPT_ROLES, read_examples

QWEN3 = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()
# ChatML with tools and tool calls written as Qwen2.5 and Hermes write them: prefix-preserving.
TOOL_CHATML = ("{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
               "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
               "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
               "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
THINKING = [{"role": "user", "content": "Tell me a joke about cats."},
            {"role": "assistant", "content": "<think>\nA short one.\n</think>\n\nCats purr-sist."},
            {"role": "user", "content": "And one about dogs?"},
            {"role": "assistant", "content": "<think>\nDogs bark.\n</think>\n\nMy dog is ruff."}]
WITH_TOOLS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "content": '{"temp_c": 21}'},
              {"role": "assistant", "content": "It is 21 degrees."}]


def chat_folder(folder, bpe_dir, template):
    """A tiny Llama whose tokenizer has ChatML's special tokens and `template` as its chat template."""
    from tokenizers import Tokenizer
    make_llama(folder, bpe_dir, vocab_size=514, max_position_embeddings=256)
    tk = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    return folder


@pytest.fixture(scope="module")
def qwen3_like(tmp_path_factory, bpe_dir):
    return chat_folder(tmp_path_factory.mktemp("qwen3-template"), bpe_dir, QWEN3)


@pytest.fixture(scope="module")
def chatml(tmp_path_factory, bpe_dir):
    return chat_folder(tmp_path_factory.mktemp("chatml"), bpe_dir, TOOL_CHATML)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=False)


# ---- the render check ---------------------------------------------------------------------------

def test_the_render_check_flags_qwen3s_multi_turn_thinking(qwen3_like):
    tok = load_tokenizer(qwen3_like)
    template = ChatTemplate(tok.chat_template, tok)
    ids, found = template.answers(THINKING)
    assert [exact for *_, exact in found] == [False, True]
    _, labels = template.tokenize(THINKING)
    scored = scored_text(tok, labels)
    assert "ruff" in scored and "Dogs bark" in scored and "purr-sist" not in scored    # the earlier answer: context
    served = template.encode(THINKING[:3], add_generation_prompt=True)
    assert ids[:len(served)] == served and labels[:len(served)] == [-100] * len(served)
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert [exact for *_, exact in template.answers(single)[1]] == [True]


def test_the_render_check_flags_no_chatml_conversation(chatml, tiny_llama):
    for tok, source in ((load_tokenizer(chatml), TOOL_CHATML), (load_tokenizer(tiny_llama), BUILT_IN["chatml"])):
        template = ChatTemplate(source, tok)
        jokes = read_examples(DATA / "joke_chats.jsonl")
        for messages in [THINKING, check_conversation(WITH_TOOLS, "t")] + [e["messages"] for e in jokes[:40]]:
            assert all(exact for *_, exact in template.answers(messages, TOOLS)[1])


def test_strict_refuses_show_batch_marks_and_the_report_counts(tmp_path, qwen3_like):
    data = write_jsonl(tmp_path / "thinking.jsonl", [{"messages": THINKING}] * 3)
    r = run_cli("train.py", "--model", qwen3_like, "--data", data, "--train-on", "strict", "--out", tmp_path / "o")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "3 assistant turns in 3 conversations" in r.stderr and "--train-on answers" in r.stderr
    assert "(the first: thinking.jsonl line " in r.stderr and not (tmp_path / "o").exists()
    r = run_cli("train.py", "--model", qwen3_like, "--data", data, "--val-split", 0, "--show-batch", 1,
                "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "render check: 3 assistant turns in 3 conversations are rendered differently" in r.stdout
    assert "! not scored: this answer is rendered otherwise at serving" in r.stdout
    assert "answers in this batch (marked !)" in r.stdout


def test_enable_thinking_off_moves_the_empty_think_block_into_the_prompt(tmp_path, qwen3_like):
    tok = load_tokenizer(qwen3_like)
    single = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    on, off = ([{"messages": single, "where": "x"}] for _ in range(2))
    render_conversations(on, [], tok, "m")
    render_conversations(off, [], tok, "m", thinking="off")
    assert scored_text(tok, on[0]["tokens"][1]).startswith("<think>\n\n</think>\n\nHello.")
    assert scored_text(tok, off[0]["tokens"][1]).startswith("Hello.")
    data = write_jsonl(tmp_path / "jokes.jsonl", [{"messages": single}] * 4)
    r = run_cli("train.py", "--model", qwen3_like, "--data", data, "--chat-template", "chatml", "--enable-thinking", "off",
                "--out", tmp_path / "o")
    assert r.returncode == 2 and "no enable_thinking switch" in r.stderr, r.stderr


# ---- tools ----------------------------------------------------------------------------------------

def test_tool_calls_are_scored_and_tool_results_never(chatml, tmp_path):
    tok = load_tokenizer(chatml)
    examples = [{"messages": check_conversation(WITH_TOOLS, "t"), "where": "t"}]
    render_conversations(examples, [], tok, "m", tools=TOOLS)
    ids, labels = examples[0]["tokens"]
    scored = scored_text(tok, labels)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in scored
    assert "It is 21 degrees.<|im_end|>" in scored
    assert "temp_c" not in scored and "Weather in Paris" not in scored and "description" not in scored
    assert '"description": "The weather in a city"' in examples[0]["text"]          # the tools are in the prompt
    row = {"messages": WITH_TOOLS, "tools": TOOLS}                                  # a row's own tools
    assert read_examples(write_jsonl(tmp_path / "t.jsonl", [row]))[0]["tools"] == TOOLS


def test_parse_tool_calls():
    content, calls = parse_tool_calls('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                      '\n</tool_call>')
    assert content == "Let me look." and len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert parse_tool_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert parse_tool_calls("plain") == ("plain", [])


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory, bpe_dir):
    """A tiny Llama trained (on the rendering train.py makes of a tools conversation) until it calls
    get_weather for a question about the weather; train.py on such data: test_tool_calls_are_scored..."""
    import torch

    from nanotune.llama import Llama
    from nanotune.losses import causal_lm_loss_sum
    folder = tmp_path_factory.mktemp("tool-model")
    base = chat_folder(folder / "base", bpe_dir, TOOL_CHATML)
    tools = folder / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    tok, model = load_tokenizer(base), Llama.from_pretrained(base)
    examples = [{"messages": check_conversation(WITH_TOOLS[:2], "t"), "where": "t"}]
    render_conversations(examples, [], tok, "m", tools=TOOLS)
    ids, labels = (torch.tensor([x]) for x in examples[0]["tokens"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(80):
        summed, count = causal_lm_loss_sum(model(ids), labels)
        (summed / count).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float(summed.detach() / count) < 0.1            # it has learned the call
    model.save_pretrained(folder / "out")
    tok.save(folder / "out")
    return folder / "out", tools


def test_chat_shows_the_tool_call_and_takes_its_result(tool_model):
    out, tools = tool_model
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(out), "--chat", "--tools", str(tools),
                        "--temperature", "0", "--max-new-tokens", "100"], input="Weather in Paris?\n{\"temp_c\": 21}\n",
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert 'tool call: get_weather({"city": "Paris"})' in r.stdout and "tool result> " in r.stdout, r.stdout


def test_the_server_returns_tool_calls(tool_model):
    from test_serve import request, start_server
    out, _ = tool_model
    proc, port = start_server(out)
    try:
        body = {"model": str(out), "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS,
                "temperature": 0, "max_tokens": 100}
        status, answer = request(port, "POST", "/v1/chat/completions", body)
        assert status == 200, answer
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        call = choice["message"]["tool_calls"][0]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and call["id"]
        # the call given back with its result: a conversation the server renders (tool role, null content)
        follow = body | {"messages": body["messages"] + [choice["message"], {"role": "tool", "content": "21"}],
                         "max_tokens": 5}
        status, answer = request(port, "POST", "/v1/chat/completions", follow)
        assert status == 200, answer
        chunks = stream(port, body | {"stream": True})                     # streamed: the call whole, at the end
        calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
        assert [c["function"] for c in calls] == [call["function"]] and calls[0]["index"] == 0
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        status, bad = request(port, "POST", "/v1/chat/completions", body | {"tools": "get_weather"})
        assert status == 400 and bad["error"]["param"] == "tools"
        status, bad = request(port, "POST", "/v1/chat/completions", body | {"enable_thinking": False})
        assert status == 400 and "enable_thinking" in bad["error"]["message"], bad
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


def stream(port, body):
    """The JSON chunks of a streamed chat completion."""
    import http.client

    from test_serve import KEY
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    text = conn.getresponse().read().decode()
    conn.close()
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_a_request_switches_qwen3s_thinking(qwen3_like):
    from nanotune.tools import openai_api as api
    tok = load_tokenizer(qwen3_like)
    template = ChatTemplate(tok.chat_template, tok)
    ask = {"messages": [{"role": "user", "content": "Hi"}]}
    default = tok.decode(api.chat_prompt(ask, template), skip_special_tokens=False)
    for off in ({"enable_thinking": False}, {"chat_template_kwargs": {"enable_thinking": False}}):
        text = tok.decode(api.chat_prompt(ask | off, template), skip_special_tokens=False)
        assert text == default + "<think>\n\n</think>\n\n"
    with pytest.raises(api.RequestError):
        api.chat_prompt(ask | {"chat_template_kwargs": {"temperature": 3}}, template)


# ---- ShareGPT and Alpaca ----------------------------------------------------------------------------

def jokes(n=12):
    return [json.loads(line) for line in (DATA / "joke_chats.jsonl").read_text().splitlines()[:n]]


def as_sharegpt(row):
    names = {role: speaker for speaker, role in SHAREGPT_ROLES.items() if speaker not in ("user", "assistant")}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]}


def as_alpaca(row):
    question, answer = row["messages"]
    return {"instruction": question["content"], "input": "", "output": answer["content"]}


@pytest.mark.parametrize("convert, kind", [(as_sharegpt, "ShareGPT"), (as_alpaca, "Alpaca")])
def test_sharegpt_and_alpaca_files_round_trip_and_train(tmp_path, tiny_llama, convert, kind):
    rows = jokes()
    path = write_jsonl(tmp_path / f"{kind}.jsonl", [convert(r) for r in rows])
    examples = read_examples(path)
    assert [e["messages"] for e in examples] == [r["messages"] for r in rows]       # read as messages...
    assert [convert({"messages": e["messages"]}) for e in examples] == [convert(r) for r in rows]   # ...and back
    assert all(e["converted"] == kind for e in examples)
    r = run_cli("train.py", "--model", tiny_llama, "--data", path, "--chat-template", "chatml", "--epochs", 1,
                "--max-length", 96, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert f"{kind}'s " in r.stdout and f": {len(rows) - round(len(rows) * 0.1)} conversations" in r.stdout, r.stdout
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_alpacas_input_goes_below_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Translate to French.", "input": "cat", "output": "chat"}])
    assert read_examples(path)[0]["messages"] == [{"role": "user", "content": "Translate to French.\n\ncat"},
                                                  {"role": "assistant", "content": "chat"}]


@pytest.mark.parametrize("line, says", [
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}, "turn 2 is from 'robot'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]}, "not an object with 'from' and 'value'"),
    ({"instruction": "Say hi.", "input": ""}, "needs a non-empty 'output'"),
])
def test_a_bad_sharegpt_or_alpaca_line_is_one_line_naming_it(tmp_path, tiny_llama, line, says):
    good = as_sharegpt(jokes(1)[0]) if "conversations" in line else as_alpaca(jokes(1)[0])
    data = write_jsonl(tmp_path / "bad.jsonl", [good, line])
    r = run_cli("train.py", "--model", tiny_llama, "--data", data, "--chat-template", "chatml", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr and "bad.jsonl line 2" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
