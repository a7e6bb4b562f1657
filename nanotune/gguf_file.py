"""GGUF, llama.cpp's one-file format, in and out.

In: `--model model.gguf` reads the file with the `gguf` package (an optional extra) and writes it
once into the Hub layout, in a cache folder, so everything else reads it as any other checkpoint:
config.json from the file's metadata, tokenizer.json from its vocabulary and merges, and
model.safetensors from its tensors, de-quantized to fp32. Two things differ from a Hub checkpoint:
- llama.cpp's names (`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj.weight`), mapped below;
- llama.cpp's Llama rotates query and key channels as adjacent pairs (0, 1), (2, 3), ... where Hugging
  Face checkpoints pair i with i + hs/2 (llama.rotate_half), so the converter permuted the rows of
  the q and k weights; `unpermute` puts them back. (Qwen2's and Qwen3's files keep Hugging Face's order.)
- Qwen3 (llama.cpp's `qwen3`) adds two tensors a block, `attn_q_norm` and `attn_k_norm`, and states its
  head size (`attention.key_length`), which is not hidden_size / heads.

Out: `write` turns a model back into a GGUF file (f32, f16 or q8_0) that llama.cpp and Ollama load.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from .errors import NanotuneError
from .files import atomic_write, cannot_write

READS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")     # the tensor types read (de-quantized)
WRITES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}      # --gguf-type: the tensor types written
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's metadata keys (after "ARCH.") -> config.json's
CONFIG_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
               "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta",
               "vocab_size": "vocab_size"}
# llama.cpp's tensor names -> the Hub's (blk.N. -> model.layers.N.)
TENSOR_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
                "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}      # the norms: Qwen3's
TOP_LEVEL = ("token_embd.weight", "output_norm.weight", "output.weight")     # output: absent when tied
BLOCK = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# How each vocabulary's text is cut into words before BPE (tokenizer.ggml.pre); others: GPT-2's own rule.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
SPLITS["llama3"] = SPLITS["llama-v3"] = SPLITS["llama-bpe"]
PRE_KEY = "gguf_pre_tokenizer"        # tokenizer_config.json: the GGUF file's tokenizer.ggml.pre, kept
CONTROL, USER_DEFINED = 3, 4          # tokenizer.ggml.token_type: special tokens, and added ones
STAGING, MARKER = ".partial-", "nanotune-conversion.json"   # a conversion in progress: FOLDER.partial-PID/MARKER


def _gguf():
    if importlib.util.find_spec("gguf") is None:
        raise NanotuneError("reading or writing GGUF files needs the gguf package: pip install gguf"
                            " (or the project's [gguf] extra)")
    import gguf
    return gguf


def cache_root() -> Path:
    return Path(os.environ.get("NANOTUNE_CACHE", Path.home() / ".cache" / "nanotune")) / "gguf"


def resolve(path) -> Path:
    """The Hub-layout folder of a GGUF file, converted on first use (the cache is keyed by the
    file's path, size and modification time, so a changed file is converted again)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    clean_staging(cache_root())
    # The conversion is written into a staging folder, named with our process id and holding a
    # marker, then renamed into place: whole, or not there. A conversion killed midway leaves its
    # staging folder, which the next conversion removes once that process is gone.
    staging = folder.with_name(f"{folder.name}{STAGING}{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        convert(path, staging)
        os.replace(staging, folder)
        (folder / MARKER).unlink()               # finished: the folder holds the model only
    except OSError as e:
        if (folder / "config.json").is_file():   # another process finished the same conversion first
            return folder
        raise cannot_write(e.filename or staging, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)     # a failed conversion leaves nothing behind
    return folder


def clean_staging(root):
    """Remove the staging folders that conversions killed midway left in the cache: only folders
    named as `resolve` names them, holding its marker (or nothing at all), whose process is gone."""
    for entry in root.glob(f"*{STAGING}*"):
        pid = entry.name.rpartition(STAGING)[2]
        if not pid.isdigit() or not entry.is_dir() or _alive(int(pid)):
            continue
        try:
            if not (entry / MARKER).is_file():
                entry.rmdir()                        # only if empty (a folder killed before its marker)
            elif json.loads((entry / MARKER).read_text()).get("host") == socket.gethostname():
                shutil.rmtree(entry)                 # process ids only mean something on their own machine
        except (OSError, ValueError):
            pass                                     # not ours, or another process is removing it


def _alive(pid) -> bool:
    if pid == os.getpid() or os.name == "nt":        # (Windows has no signal 0: keep everything)
        return True
    try:
        os.kill(pid, 0)                              # signal 0: asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:                                  # it exists, under another user
        return True
    return True


# ---- reading ------------------------------------------------------------------------------------

def metadata(reader) -> dict:
    """Every metadata field, as Python values (the vocabulary and merges as lists of strings)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute(weight, heads):
    """Undo llama.cpp's permutation of a q or k weight's rows: within each head, rows (0, 1), (2, 3),
    ... back to (0, hs/2), (1, hs/2 + 1), ..., Hugging Face's rotate_half pairing."""
    hs = weight.shape[0] // heads
    return weight.reshape(heads, hs // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute(weight, heads):
    """unpermute's inverse: Hugging Face's pairing to llama.cpp's, for writing a GGUF."""
    hs = weight.shape[0] // heads
    return weight.reshape(heads, 2, hs // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hub_name(name):
    """llama.cpp's tensor name -> the Hub's: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{TENSOR_NAMES[part]}.{kind}" if part in TENSOR_NAMES else None
    return f"{TENSOR_NAMES[stem]}.{kind}" if stem in TENSOR_NAMES else None


def convert(path, folder):
    """Write the GGUF file's config, tokenizer and de-quantized weights into `folder`, Hub layout."""
    config, tokenizer, tokenizer_config, tensors = read(path)
    from safetensors.torch import save_file
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def read(path):
    """(config.json's contents, a `tokenizers` Tokenizer, tokenizer_config.json's contents, the
    de-quantized weights under the Hub's names) of a GGUF file, in memory. The metadata and every
    tensor's name and shape are checked before any tensor's data is read."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:      # the gguf package raises ValueError and others for a file that is not GGUF
        raise NanotuneError(f"{path} is not a GGUF file that can be read ({str(e).splitlines()[0]}):"
                            " check the file, or download it again") from None
    meta = metadata(reader)
    names = [t.name for t in reader.tensors]
    config = read_config(meta, names, path)
    check_tensors(config, {t.name: tuple(reversed([int(n) for n in t.shape])) for t in reader.tensors}, path)
    tokenizer, tokenizer_config = read_tokenizer(meta, path)

    arch, tensors = config["model_type"], {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in READS:
            raise NanotuneError(f"{path}: tensor {t.name} is stored as {kind}, which nanotune does not read"
                                f" (it reads {', '.join(READS)}): use a file quantized to one of those")
    for t in reader.tensors:
        name = hub_name(t.name)
        weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            weight = unpermute(weight, heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weight))
    return config, tokenizer, tokenizer_config, tensors


def read_config(meta, names, path) -> dict:
    """config.json's contents from the metadata, after checking the numbers the model is built from."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NanotuneError(f"{path} holds a {arch!r} model; nanotune reads GGUF files of the Llama family"
                            f" ({', '.join(ARCHITECTURES)})")
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        value = meta.get(f"{arch}.{key}")
        if not isinstance(value, int) or value < 1:
            raise NanotuneError(f"{path}: its metadata {arch}.{key} is {value!r}, not a positive whole number:"
                                " the file is damaged or was written wrongly; download it again")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise NanotuneError(f"{path} holds no vocabulary (tokenizer.ggml.tokens): nanotune needs the"
                            " tokenizer stored in the file; use a GGUF file that includes it")
    config = {value: meta[f"{arch}.{key}"] for key, value in CONFIG_KEYS.items() if f"{arch}.{key}" in meta}
    config.setdefault("num_key_value_heads", config["num_attention_heads"])   # llama.cpp's default
    config.setdefault("vocab_size", len(tokens))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise NanotuneError(f"{path}: {kv_heads!r} key/value heads cannot serve {heads} query heads (it must"
                            " divide them): the file is damaged or was written wrongly; download it again")
    head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.rope.dimension_count",
                                                                  config["hidden_size"] // heads))
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise NanotuneError(f"{path}: a head of {head_dim!r} channels cannot be rotated in pairs (RoPE):"
                            " the file is damaged or was written wrongly; download it again")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None and not (isinstance(index, int) and 0 <= index < len(tokens)):
            raise NanotuneError(f"{path}: tokenizer.ggml.{key} is {index!r}, outside its vocabulary of"
                                f" {len(tokens):,} tokens: the file is damaged or was written wrongly")
    config |= {"model_type": arch, "architectures": [ARCHITECTURES[arch]], "head_dim": head_dim,
               "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
               "torch_dtype": "float32"}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "tokenizer.ggml." + key.replace("pad_", "padding_")
        if gguf_key in meta:
            config[key] = meta[gguf_key]
    return config


def expected_shape(config, name):
    """The shape (Hub order: rows first) a tensor of this config has, by llama.cpp's name; None if
    it has no place in the model."""
    C, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"token_embd.weight": (V, C), "output_norm.weight": (C,), "output.weight": (V, C),
              "attn_norm.weight": (C,), "ffn_norm.weight": (C,), "attn_q.weight": (q, C), "attn_k.weight": (kv, C),
              "attn_v.weight": (kv, C), "attn_output.weight": (C, q), "ffn_gate.weight": (I, C),
              "ffn_up.weight": (I, C), "ffn_down.weight": (C, I),
              "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),      # the biases: Qwen2's
              "attn_q_norm.weight": (config["head_dim"],), "attn_k_norm.weight": (config["head_dim"],)}
    if name.startswith("blk."):
        _, block, name = name.split(".", 2)
        if not block.isdigit() or int(block) >= config["num_hidden_layers"] or name in TOP_LEVEL:
            return None
    elif name not in TOP_LEVEL:
        return None
    return shapes.get(name)


def check_tensors(config, found, path):
    """Every tensor in `found` (name -> shape) has its place and shape, and every block is there
    with all its weights: checked on the names and shapes alone, before any data is read."""
    blocks = config["num_hidden_layers"]
    present = {name.split(".")[1] for name in found if name.startswith("blk.")}
    if len(present) != blocks:
        raise NanotuneError(f"{path}: its metadata says {blocks:,} blocks and it holds tensors for {len(present):,}:"
                            " the file is damaged or was written wrongly; download it again")
    for name, shape in found.items():
        expected = expected_shape(config, name)
        if expected is None:
            raise NanotuneError(f"{path}: tensor {name} has no place in a Llama-family model of {blocks:,} blocks:"
                                " the file is damaged or was written wrongly; download it again")
        if shape != expected:
            raise NanotuneError(f"{path}: tensor {name} is {shape}, where the metadata ({config['num_attention_heads']}"
                                f" heads, {config['num_key_value_heads']} key/value heads of {config['head_dim']}"
                                f" channels, width {config['hidden_size']}) makes it {expected}: the file is damaged"
                                " or was written wrongly; download it again")
    parts = BLOCK + (("attn_q_norm", "attn_k_norm") if config["model_type"] == "qwen3" else ())
    needed = [name for name in TOP_LEVEL[:2]] + [f"blk.{n}.{part}.weight" for n in range(blocks) for part in parts]
    missing = [name for name in needed if name not in found]
    if missing:
        raise NanotuneError(f"{path}: {len(missing):,} tensors are missing (the first: {missing[0]}): the file is"
                            " damaged or was written wrongly; download it again")


def read_tokenizer(meta, path):
    """(a `tokenizers` Tokenizer, tokenizer_config.json's contents) from the vocabulary, merges and
    special tokens stored in the metadata: byte-level BPE, as transformers builds it from a GGUF."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise NanotuneError(f"{path}: its tokenizer is {meta.get('tokenizer.ggml.model')!r}; nanotune reads the"
                            " byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2') of SmolLM2, Llama 3 and"
                            " Qwen2")
    tokens, kinds = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    split = SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True)
                           for t, k in zip(tokens, kinds) if k == CONTROL])
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, kinds) if k == USER_DEFINED])
    config = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        if index is not None:
            config[f"{name}_token"] = tokens[index]
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    if "tokenizer.ggml.pre" in meta:
        config[PRE_KEY] = meta["tokenizer.ggml.pre"]          # written back unchanged by --export-gguf
    return tk, config


# ---- writing ------------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer):
    """llama.cpp's name for how this tokenizer cuts text into words (tokenizer.ggml.pre). A tokenizer
    read from a GGUF file keeps the file's name; for others, the name llama.cpp's converter
    (convert_hf_to_gguf.py) writes, read off the pre-tokenizer: Llama 3's and Qwen2's split rules by
    their regex, GPT-2's byte-level rule ('gpt-2'), SmolLM's digits one by one then GPT-2's."""
    settings = tokenizer.folder / "tokenizer_config.json" if getattr(tokenizer, "folder", None) else None
    if settings is not None and settings.is_file():
        recorded = json.loads(settings.read_text(encoding="utf-8")).get(PRE_KEY)
        if recorded:
            return recorded
    spec = json.loads(tokenizer.tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec])
    kinds = [p.get("type") for p in parts]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level_rule = parts[-1].get("type") == "ByteLevel" and parts[-1].get("use_regex", True)
    for name, split in (("llama-bpe", SPLITS["llama-bpe"]), ("qwen2", SPLITS["qwen2"])):
        if kinds == ["Split", "ByteLevel"] and regexes == [split] and not byte_level_rule:
            return name
    if kinds == ["ByteLevel"] and byte_level_rule:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and byte_level_rule:
        return "smollm"
    raise NanotuneError(f"--export-gguf: this tokenizer cuts text into words in a way nanotune cannot name for"
                        f" llama.cpp ({' + '.join(map(str, kinds))}), so llama.cpp would tokenize differently;"
                        " nanotune names GPT-2's, SmolLM's, Llama 3's and Qwen2's")


def write(model, tokenizer, path, kind="f16"):
    """Write a Llama-family model (plain weights: merge a LoRA adapter first) and its tokenizer as
    a GGUF file llama.cpp and Ollama load: 2-d weights in `kind` (f32, f16 or q8_0), norms and biases
    in f32, as llama.cpp's own converter writes them."""
    gguf = _gguf()
    cfg, arch = model.config, model.config.model_type
    if arch == "gemma3_text":
        raise NanotuneError("--export-gguf does not write Gemma 3: llama.cpp keeps its tokenizer as SentencePiece,"
                            " which nanotune does not write; use llama.cpp's convert_hf_to_gguf.py on the saved folder")
    if arch not in ARCHITECTURES:
        raise NanotuneError(f"--export-gguf writes Llama-family models ({', '.join(ARCHITECTURES)});"
                            f" this one is {arch!r}")
    if arch == "qwen3" and cfg.attention_bias:
        raise NanotuneError("--export-gguf: this Qwen3 has attention biases, which llama.cpp's qwen3 does not read")
    if cfg.rope()["rope_type"] != "default":
        raise NanotuneError(f"--export-gguf: this model's RoPE is scaled ({cfg.rope()['rope_type']}), which"
                            " nanotune does not write to GGUF yet")
    qtype = getattr(gguf.GGMLQuantizationType, WRITES[kind])
    pre = pre_tokenizer_name(tokenizer)

    def add_everything(writer):
        writer.add_name(Path(str(getattr(model, "name_or_path", "model"))).name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_freq_base(float(cfg.rope()["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_key_length(cfg.head_dim)                         # a head's size, stated (Qwen3's is its own)
        writer.add_value_length(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[kind])
        add_tokenizer(writer, tokenizer, cfg.vocab_size, pre)
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue                                             # llama.cpp reads token_embd for both
            data = tensor.detach().float().cpu().numpy()
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                data = permute(data, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
            name = gguf_name(name)
            if data.ndim == 1 or kind == "f32":
                writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            elif kind == "f16" or data.shape[-1] % 32:               # q8_0 needs rows in blocks of 32
                writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)

    def write_file(tmp):
        writer = gguf.GGUFWriter(tmp, arch)
        add_everything(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    atomic_write(path, write_file)


def gguf_name(name):
    """The Hub's tensor name -> llama.cpp's (hub_name's inverse)."""
    back = {hub: cpp for cpp, hub in TENSOR_NAMES.items()}
    stem, _, kind = name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{back[part]}.{kind}"
    return f"{back[stem]}.{kind}"


def add_tokenizer(writer, tokenizer, vocab_size, pre):
    """The vocabulary (padded to the embedding's rows), its merges, which tokens are special, the
    special ids and the chat template."""
    spec = json.loads(tokenizer.tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise NanotuneError("--export-gguf writes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2);"
                            f" this one is {spec['model']['type']}")
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    kinds = [1] * vocab_size                                         # 1: a normal token
    for token, index in vocab.items():
        if index < vocab_size:
            tokens[index] = token
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            kinds[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    for i, token in enumerate(tokens):
        if token.startswith("[PAD") and token not in vocab:
            kinds[i] = USER_DEFINED                                  # rows with no token of their own
    merges = spec["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for name, add in (("bos_id", writer.add_bos_token_id), ("eos_id", writer.add_eos_token_id),
                      ("pad_id", writer.add_pad_token_id)):
        if getattr(tokenizer, name, None) is not None:
            add(getattr(tokenizer, name))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
