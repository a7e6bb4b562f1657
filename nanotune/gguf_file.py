"""GGUF, llama.cpp's one-file format, in and out.

In: `--model model.gguf` reads the file with the `gguf` package (an optional extra) and writes it
once into the Hub layout, in a cache folder, so everything else reads it as any other checkpoint:
config.json from the file's metadata, tokenizer.json from its vocabulary and merges, and
model.safetensors from its tensors, de-quantized to fp32. Two things differ from a Hub checkpoint:
- llama.cpp's names (`blk.0.attn_q.weight` for `model.layers.0.self_attn.q_proj.weight`), mapped below;
- llama.cpp's Llama rotates query and key channels as adjacent pairs (0, 1), (2, 3), ... where Hugging
  Face checkpoints pair i with i + hs/2 (llama.rotate_half), so the converter permuted the rows of
  the q and k weights; `unpermute` puts them back. (Qwen2's files keep Hugging Face's order.)

Out: `write` turns a model back into a GGUF file (f32, f16 or q8_0) that llama.cpp and Ollama load.
"""
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import NanotuneError
from .files import atomic_write, cannot_write

READS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")     # the tensor types read (de-quantized)
WRITES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}      # --gguf-type: the tensor types written
ARCHITECTURES = ("llama", "qwen2")
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
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# How each vocabulary's text is cut into words before BPE (tokenizer.ggml.pre); others: GPT-2's own rule.
SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
SPLITS["llama3"] = SPLITS["llama-v3"] = SPLITS["llama-bpe"]
CONTROL, USER_DEFINED = 3, 4          # tokenizer.ggml.token_type: special tokens, and added ones


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
    staging = folder.with_name(folder.name + f".partial-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        convert(path, staging)
        os.replace(staging, folder)          # whole, or not there: a killed conversion is redone
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if (folder / "config.json").is_file():   # another process finished the same conversion first
            return folder
        raise cannot_write(e.filename or staging, e) from None
    return folder


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
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:      # the gguf package raises ValueError and others for a file that is not GGUF
        raise NanotuneError(f"{path} is not a GGUF file that can be read ({str(e).splitlines()[0]}):"
                            " check the file, or download it again") from None
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise NanotuneError(f"{path} holds a {arch!r} model; nanotune reads GGUF files of the Llama family"
                            f" ({', '.join(ARCHITECTURES)})")
    names = [t.name for t in reader.tensors]
    config = {value: meta[f"{arch}.{key}"] for key, value in CONFIG_KEYS.items() if f"{arch}.{key}" in meta}
    architecture = "LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"
    config |= {"model_type": arch, "architectures": [architecture],
               "tie_word_embeddings": "output.weight" not in names, "hidden_act": "silu",
               "torch_dtype": "float32"}
    config.setdefault("vocab_size", len(meta["tokenizer.ggml.tokens"]))
    if f"{arch}.rope.dimension_count" in meta:
        config["head_dim"] = meta[f"{arch}.rope.dimension_count"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        gguf_key = "tokenizer.ggml." + key.replace("pad_", "padding_")
        if gguf_key in meta:
            config[key] = meta[gguf_key]
    tokenizer, tokenizer_config = read_tokenizer(meta, path)

    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in READS:
            raise NanotuneError(f"{path}: tensor {t.name} is stored as {kind}, which nanotune does not read"
                                f" (it reads {', '.join(READS)}): use a file quantized to one of those")
        name = hub_name(t.name)
        if name is None:
            raise NanotuneError(f"{path}: tensor {t.name} has no place in a Llama-family model")
        weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            weight = unpermute(weight, heads)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(weight))
    from safetensors.torch import save_file
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


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
    return tk, config


# ---- writing ------------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer):
    """llama.cpp's name for how this tokenizer cuts text into words (tokenizer.ggml.pre), read off
    its pre-tokenizer: Llama 3's and Qwen2's split rules by their regex; GPT-2's byte-level rule;
    SmolLM2's digits one by one, then GPT-2's."""
    spec = json.loads(tokenizer.tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec])
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    for name, split in (("llama-bpe", SPLITS["llama-bpe"]), ("qwen2", SPLITS["qwen2"])):
        if split in regexes:
            return name
    if any(p.get("type") == "Digits" for p in parts):
        return "smollm"
    return "gpt2"


def write(model, tokenizer, path, kind="f16"):
    """Write a Llama-family model (plain weights: merge a LoRA adapter first) and its tokenizer as
    a GGUF file llama.cpp and Ollama load: 2-d weights in `kind` (f32, f16 or q8_0), norms and biases
    in f32, as llama.cpp's own converter writes them."""
    gguf = _gguf()
    cfg, arch = model.config, model.config.model_type
    if arch not in ARCHITECTURES:
        raise NanotuneError(f"--export-gguf writes Llama-family models ({', '.join(ARCHITECTURES)});"
                            f" this one is {arch!r}")
    if cfg.rope()["rope_type"] != "default":
        raise NanotuneError(f"--export-gguf: this model's RoPE is scaled ({cfg.rope()['rope_type']}), which"
                            " nanotune does not write to GGUF yet")
    qtype = getattr(gguf.GGMLQuantizationType, WRITES[kind])

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
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[kind])
        add_tokenizer(writer, tokenizer, cfg.vocab_size)
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


def add_tokenizer(writer, tokenizer, vocab_size):
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
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
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
