"""Generation: greedy tokens equal to `transformers`, batching that changes nothing, exact
sampling filters, reproducible sampling, and the generate.py command line."""
import pytest
import torch
from conftest import run_cli

from nanotune import GPT2, load_tokenizer
from nanotune.generation import generate, repetition_penalty_, top_k_filter, top_p_filter
from nanotune.generation import KVCache

PROMPTS = ["My grandmother keeps a spare key", "Why", "The weather forecast said there was a thirty percent chance"]


@pytest.fixture(scope="module")
def models(tiny_gpt2):
    from transformers import GPT2LMHeadModel
    return GPT2.from_pretrained(tiny_gpt2), GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval(), load_tokenizer(tiny_gpt2)


def reference_greedy(ref, tok, prompts, n):
    """transformers' greedy generate, as a batch with left padding; EOS and padding removed."""
    from transformers import PreTrainedTokenizerFast
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.tokenizer, pad_token="<|endoftext|>", padding_side="left")
    enc = hf_tok(prompts, return_tensors="pt", padding=True)
    out = ref.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)
    results = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        results.append(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
    return results


def test_greedy_equals_transformers_alone_and_batched(models):
    ours, ref, tok = models
    prompts = [tok.encode(p) for p in PROMPTS]
    alone = [generate(ours, [p], 40, tok.pad_id, tok.eos_id, temperature=0)[0] for p in prompts]
    batched = generate(ours, prompts, 40, tok.pad_id, tok.eos_id, temperature=0)
    assert sum(map(len, alone)) > 40            # the comparison covers real continuations
    for i, text in enumerate(PROMPTS):
        assert alone[i] == reference_greedy(ref, tok, [text], 40)[0]
    assert batched == alone
    assert batched == reference_greedy(ref, tok, PROMPTS, 40)


def test_kv_cache_step_equals_full_forward(models):
    ours, _, tok = models
    ids = torch.tensor([tok.encode(PROMPTS[2])])
    cache = KVCache(*ours.cache_layout(), 1, ids.shape[1])
    with torch.no_grad():
        ours(ids[:, :-3], cache=cache)
        stepped = torch.cat([ours(ids[:, t:t + 1], cache=cache) for t in range(ids.shape[1] - 3, ids.shape[1])], dim=1)
        assert (stepped - ours(ids)[:, -3:]).abs().max() < 1e-5


def test_sampling_is_reproducible_with_a_seed(models):
    ours, _, tok = models
    prompt = [tok.encode(PROMPTS[0])]
    sample = lambda seed: generate(ours, prompt * 2, 30, tok.pad_id, None, temperature=1.0, top_k=50, top_p=0.95,
                                   generator=torch.Generator().manual_seed(seed))
    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0]])
    assert top_k_filter(logits, 2).isfinite().tolist() == [[False, True, False, False, True]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.15, 0.05]])
    logits = probs.log()
    assert top_p_filter(logits, 0.7).isfinite().tolist() == [[False, True, True, False, False]]   # 0.5 + 0.25 >= 0.7
    assert top_p_filter(logits, 0.75).isfinite().tolist() == [[False, True, True, False, False]]
    assert top_p_filter(logits, 0.76).isfinite().tolist() == [[False, True, True, True, False]]
    assert top_p_filter(logits, 1e-6).isfinite().tolist() == [[False, True, False, False, False]]  # never empty


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert repetition_penalty_(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_cli_streams_a_continuation_and_stops_at_a_stop_string(tiny_gpt2, models):
    ours, _, tok = models
    greedy = tok.decode(generate(ours, [tok.encode("Why")], 30, tok.pad_id, tok.eos_id, temperature=0)[0])
    stop = greedy[5:9]
    r = run_cli("generate.py", "--model", tiny_gpt2, "--prompt", "Why", "--temperature", 0, "--max-new-tokens", 30, "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Why" + greedy[:greedy.find(stop)] + "\n"


def test_cli_batch_and_samples(tiny_gpt2):
    r = run_cli("generate.py", "--model", tiny_gpt2, "--prompt", "Why", "--prompt", "My dog", "--num-samples", 2,
                "--seed", 3, "--max-new-tokens", 10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- prompt") == 4 and "--- prompt 2, sample 2\nMy dog" in r.stdout
    again = run_cli("generate.py", "--model", tiny_gpt2, "--prompt", "Why", "--prompt", "My dog", "--num-samples", 2,
                    "--seed", 3, "--max-new-tokens", 10)
    assert again.stdout == r.stdout


def test_cli_predicts_labels_with_a_classifier(tmp_path, tiny_bert):
    from nanotune import BertClassifier
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(tmp_path)
    load_tokenizer(tiny_bert).save(tmp_path)
    r = run_cli("generate.py", "--model", tmp_path, "--prompt", "Lovely staff!", "--prompt", "Cold soup.")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("negative", "positive") and "positive=" in lines[0]
    probs = [float(part.split("=")[1]) for part in lines[1].split("\t")[1].split()]
    assert abs(sum(probs) - 1) < 2e-3


@pytest.mark.parametrize("args, pattern", [
    (["--prompt", ""], "a prompt is empty"),
    (["--prompt", "word " * 80], "context is 64"),
    (["--top-p", "1.5"], "--top-p: 1.5 is out of range: give a number in \\(0, 1\\]"),
    (["--temperature", "-1"], "--temperature: -1 is out of range: give a number >= 0"),
])
def test_cli_bad_input(tiny_gpt2, args, pattern):
    import re
    r = run_cli("generate.py", "--model", tiny_gpt2, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and re.search(pattern, r.stderr), r.stderr


def test_cli_folder_that_is_not_a_model(tmp_path):
    r = run_cli("generate.py", "--model", tmp_path, "--prompt", "hi")
    assert r.returncode == 2 and r.stderr.startswith("error: no config.json")


# Runs generate.py with nanotune.generation.generate watched: each batch's size goes to stderr.
WATCH_BATCHES = r"""
import runpy, sys
import nanotune.generation as generation
real = generation.generate
def watched(model, prompts, *args, **kwargs):
    print(f"batch of {len(prompts)}", file=sys.stderr)
    return real(model, prompts, *args, **kwargs)
generation.generate = watched
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_prompt_file_runs_in_batches_with_the_results_in_order(tmp_path, tiny_gpt2, models):
    import subprocess
    import sys
    from conftest import ROOT
    ours, _, tok = models
    prompts = [f"{start} {n}" for n, start in enumerate(PROMPTS * 4)]            # 12 prompts, 3 lengths
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    r = subprocess.run([sys.executable, "-c", WATCH_BATCHES, str(ROOT / "generate.py"), "--model", str(tiny_gpt2),
                        "--prompt-file", str(tmp_path / "prompts.txt"), "--batch-size", "5", "--temperature", "0",
                        "--max-new-tokens", "12"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["batch of 5", "batch of 5", "batch of 2"]
    alone = [tok.decode(generate(ours, [tok.encode(p)], 12, tok.pad_id, tok.eos_id, temperature=0)[0]) for p in prompts]
    assert r.stdout == "".join(f"--- prompt {k + 1}, sample 1\n{p}{text}\n"
                               for k, (p, text) in enumerate(zip(prompts, alone)))


def test_a_classifier_labels_a_prompt_file_in_batches(tmp_path, tiny_bert):
    from nanotune import BertClassifier
    BertClassifier.from_pretrained(tiny_bert, labels=["negative", "positive"]).save_pretrained(tmp_path / "m")
    load_tokenizer(tiny_bert).save(tmp_path / "m")
    texts = ["Lovely staff!", "Cold soup.", "The waiter forgot us twice, but the dessert made up for it.", "Fine."] * 2
    (tmp_path / "texts.txt").write_text("\n".join(texts))
    together, batched = (run_cli("generate.py", "--model", tmp_path / "m", "--prompt-file", tmp_path / "texts.txt",
                                 "--batch-size", n) for n in (100, 3))
    assert together.returncode == batched.returncode == 0, batched.stderr
    assert [line.split("\t")[2] for line in batched.stdout.splitlines()] == texts
    rounded = lambda out: [[round(float(s.split("=")[1]), 2) for s in line.split("\t")[1].split()]
                           for line in out.splitlines()]
    assert rounded(batched.stdout) == rounded(together.stdout)


def test_a_prompt_that_is_not_text_in_the_locales_encoding_is_one_line(tiny_gpt2):
    import os
    import subprocess
    import sys
    from conftest import ROOT
    latin1 = "café au lait".encode("latin-1")                    # a Latin-1 terminal under a UTF-8 locale
    r = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(tiny_gpt2), "--prompt", latin1],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, LC_ALL="C.UTF-8"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "byte 0xe9 at position 3 is not utf-8 text" in r.stderr
