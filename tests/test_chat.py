"""Chat fine-tuning: conversations rendered by the model's own chat template exactly as transformers
renders them (ChatML, Llama-3-style and Qwen2-style templates), the loss on the answers only
(checked against the answers found token by token), packed conversations that do not see each
other, bad conversations refused in one line, and the same greedy reply from --prompt and --chat."""
import json
import shutil

import pytest
import torch
from conftest import make_llama, run_cli

import train
from nanotune import load_tokenizer
from nanotune.chat import BUILT_IN, ChatTemplate
from nanotune.data import lm_sequences, make_batch, pack_examples
from nanotune.llama import Llama

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>'"
          " + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0"
          " == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt"
          " %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
         "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' +"
         " message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
         "assistant\n' }}{% endif %}")
SPECIALS = {"chatml": ["<|im_start|>", "<|im_end|>"], "qwen2": ["<|im_start|>", "<|im_end|>"],
            "llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
TEMPLATES = {"chatml": BUILT_IN["chatml"], "qwen2": QWEN2, "llama3": LLAMA3}
# where an answer starts (the tokens before it) and the token that ends it, for the independent reference
ANSWER = {"chatml": (["<|im_start|>", "assistant", "\n"], "<|im_end|>"), "qwen2": (["<|im_start|>", "assistant", "\n"], "<|im_end|>"),
          "llama3": (["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"], "<|eot_id|>")}
CONVERSATION = [{"role": "system", "content": "You tell short jokes."},
                {"role": "user", "content": "Tell me a joke about cats."},
                {"role": "assistant", "content": "Why did the cat sit on the computer? To keep an eye on the mouse."},
                {"role": "user", "content": "And one about dogs?"},
                {"role": "assistant", "content": "My dog ate my homework. It took him two bites, he said it was ruff."}]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def chat_tokenizer(request, tmp_path_factory, bpe_dir):
    """(our tokenizer, transformers' tokenizer, the template's name): the tiny BPE vocabulary with the
    template's special tokens, and the template in tokenizer_config.json."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    name, folder = request.param, tmp_path_factory.mktemp(f"tok-{request.param}")
    tk = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tk.add_special_tokens(SPECIALS[name])
    tk.save(str(folder / "tokenizer.json"))
    eos = SPECIALS[name][-1]
    bos = SPECIALS[name][0] if name == "llama3" else "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATES[name], "eos_token": eos,
                                                              "bos_token": bos}))
    ref = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=TEMPLATES[name], eos_token=eos, bos_token=bos)
    return load_tokenizer(folder), ref, name


def ids_of(encoding):
    return list(encoding["input_ids"]) if hasattr(encoding, "keys") else list(encoding)


def test_rendering_equals_transformers_apply_chat_template(chat_tokenizer):
    ours, ref, _ = chat_tokenizer
    template = ChatTemplate(ours.chat_template, ours)
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:4], True), (CONVERSATION[1:2], True)):
        assert template.render(messages, prompt) == ref.apply_chat_template(messages, tokenize=False,
                                                                            add_generation_prompt=prompt)
        assert template.encode(messages, prompt) == ids_of(ref.apply_chat_template(messages, tokenize=True,
                                                                                   add_generation_prompt=prompt))


def test_the_loss_scores_the_answers_and_their_end_of_turn_tokens_only(chat_tokenizer):
    ours, _, name = chat_tokenizer
    ids, labels = ChatTemplate(ours.chat_template, ours).tokenize(CONVERSATION)
    # The reference, found token by token: after each "assistant" header, up to and including the end-of-turn token.
    opening, end = ANSWER[name]
    opening_ids = [ours.tokenizer.token_to_id(t) for t in opening[:1]]
    header = ours.encode("".join(opening), add_special_tokens=False)
    expected, i = [-100] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            while ids[j] != ours.tokenizer.token_to_id(end):
                expected[j] = ids[j]
                j += 1
            expected[j] = ids[j]                                      # the end-of-turn token: the model learns to stop
            i = j
        i += 1
    assert opening_ids and labels == expected
    scored = ours.decode([t for t in labels if t != -100], skip_special_tokens=False)
    assert "mouse." in scored and "ruff." in scored and "Tell me" not in scored and "jokes." not in scored
    all_ids, all_labels = ChatTemplate(ours.chat_template, ours).tokenize(CONVERSATION, train_on="all")
    assert all_ids == ids and all_labels == ids


def test_packed_conversations_give_the_same_per_example_losses(tmp_path, bpe_dir, chat_tokenizer):
    ours, _, name = chat_tokenizer
    if name != "chatml":
        pytest.skip("one template is enough for the packing")
    folder = make_llama(tmp_path / "m", bpe_dir, vocab_size=ours.vocab_size, max_position_embeddings=512)
    model = Llama.from_pretrained(folder).eval()
    template = ChatTemplate(ours.chat_template, ours)
    conversations = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:]]
    pairs = [template.tokenize(c) for c in conversations]
    blocks, block_labels = pack_examples([i for i, _ in pairs], [lab for _, lab in pairs], 512)
    assert len(blocks) == 1 and blocks[0].starts == [0, len(pairs[0][0]), len(pairs[0][0]) + len(pairs[1][0])]
    packed = make_batch("lm", blocks, block_labels, [0], ours.pad_id, "cpu")
    assert packed["position_ids"][0, blocks[0].starts[1]] == 0                   # positions restart per example
    with torch.no_grad():
        logits = model(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
        losses = token_losses(logits, packed["labels"])[0]
        for k, (ids, labels) in enumerate(pairs):
            alone = make_batch("lm", [ids], [labels], [0], ours.pad_id, "cpu")
            expected = token_losses(model(alone["input_ids"]), alone["labels"])[0].sum()
            start = blocks[0].starts[k]
            assert losses[start:start + len(ids)].sum() == pytest.approx(float(expected), abs=1e-4)


def token_losses(logits, labels):
    from nanotune.losses import next_token_labels
    targets = next_token_labels(labels)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("line, pattern", [
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}, "content is 42, not text"),
    ({"text": "a plain line"}, "not a messages conversation like the file's first line"),
])
def test_a_bad_conversation_is_one_line(tmp_path, tiny_llama, line, pattern):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    r = run_cli("train.py", "--model", tiny_llama, "--data", data, "--chat-template", "chatml", "--out", tmp_path / "o")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and pattern in r.stderr and "line 2" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_a_model_without_a_template_says_what_to_do(tmp_path, tiny_llama):
    r = run_cli("train.py", "--model", tiny_llama, "--data", "joke_chats.jsonl", "--out", tmp_path / "o")
    assert r.returncode == 2 and "no chat template" in r.stderr and "--chat-template chatml" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, bpe_dir):
    """A tiny Llama trained one epoch on the joke conversations with ChatML, saved with its template."""
    folder = tmp_path_factory.mktemp("chat")
    tokenizer_folder = folder / "base"
    make_llama(tokenizer_folder, bpe_dir, vocab_size=514)
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    tk.add_special_tokens(SPECIALS["chatml"])
    tk.save(str(tokenizer_folder / "tokenizer.json"))
    (tokenizer_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": BUILT_IN["chatml"],
                                                                        "eos_token": "<|im_end|>"}))
    r = run_cli("train.py", "--model", tokenizer_folder, "--data", "joke_chats.jsonl", "--epochs", 1, "--lr", "3e-3",
                "--pack", "--max-length", 128, "--out", folder / "out")
    assert r.returncode == 0, r.stderr
    return folder / "out", r.stdout


def test_training_on_conversations_scores_the_answers(chat_model):
    out, stdout = chat_model
    assert (out / "chat_template.jinja").read_text() == BUILT_IN["chatml"]
    r = run_cli("generate.py", "--model", out, "--eval", "joke_chats.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert scores["conversations"] == 244 and 0 < scores["answer_tokens"] < 244 * 128
    r = run_cli("train.py", "--model", out, "--data", "joke_chats.jsonl", "--show-batch", 1, "--out", out.parent / "x")
    assert r.returncode == 0 and "not scored" in r.stdout and "<|im_end|>" in r.stdout, r.stderr


def test_prompt_and_chat_give_the_same_greedy_reply(chat_model):
    out, _ = chat_model
    question = "Tell me a joke about cats."
    prompt = run_cli("generate.py", "--model", out, "--prompt", question, "--temperature", 0, "--max-new-tokens", 20)
    assert prompt.returncode == 0, prompt.stderr
    import subprocess
    import sys
    from conftest import ROOT
    chat = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(out), "--chat", "--temperature", "0",
                           "--max-new-tokens", "20"], input=question + "\n", capture_output=True, text=True, cwd=ROOT)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.removeprefix("> ").removesuffix("> ").strip() == prompt.stdout.strip() != ""
    model, tok = Llama.from_pretrained(out), load_tokenizer(out)
    template = ChatTemplate(tok.chat_template, tok)
    from nanotune.generation import generate
    ids = template.encode([{"role": "user", "content": question}], add_generation_prompt=True)
    reply = generate(model, [ids], 20, tok.pad_id, template.stop_ids(), temperature=0)[0]
    assert tok.decode(reply) == prompt.stdout.strip()
    shutil.rmtree(out.parent / "x", ignore_errors=True)
