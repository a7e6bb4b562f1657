"""Hub ids and folders -> files; reading and writing weights in the Hub layout.

A model is named either by a local folder or by a Hugging Face Hub id ("gpt2").
Hub ids go through `huggingface_hub`, which keeps a local cache and honours
HF_HUB_OFFLINE. Weights are read from safetensors only: pickled `.bin` files can
run code when loaded, so nanotune refuses them.
"""
import dataclasses
import json
import os
import types
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import files, tricks
from .tricks import own_memory  # noqa: F401  (the transposed_views trick's; the optimizer and DDP call it)
from .errors import NanotuneError

# What nanotune needs from a model repository; nothing else is downloaded.
WANTED_FILES = [
    "config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "vocab.txt", "adapter_config.json", "chat_template.jinja",
]


def resolve(name_or_path) -> Path:
    """A local folder as is, a GGUF file converted into a folder in the Hub layout (gguf_file.py), or
    a Hub id downloaded into (or found in) the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from . import gguf_file
        return gguf_file.resolve(path)
    if path.exists():
        raise NanotuneError(f"{name_or_path} is a file, not a model folder: pass the folder that holds config.json"
                            " (or a .gguf file)")
    if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1:
        raise NanotuneError(f"no folder {name_or_path}: pass an existing model folder or a Hub id such as gpt2")
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=WANTED_FILES))
    except hub_errors.HFValidationError:
        raise NanotuneError(f"{name_or_path!r} is neither a folder nor a valid Hub id: pass a model folder or"
                            " an id such as gpt2") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError):
        raise NanotuneError(f"no model {name_or_path!r} on the Hugging Face Hub (or it is private or gated):"
                            " check the id, or log in with `hf auth login`") from None
    except hub_errors.LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise NanotuneError(f"model {name_or_path!r} is not in the local Hugging Face cache and the Hub cannot be"
                            f" reached{offline}: download it once while online, or pass a local model folder") from None
    except hub_errors.HfHubHTTPError as e:
        raise NanotuneError(f"could not download {name_or_path!r} from the Hub ({str(e).splitlines()[0]}):"
                            " check the id and your network") from None


def read_config(folder: Path, model_types: tuple) -> dict:
    """config.json as a dict, after checking that it describes a model type we implement."""
    path = folder / "config.json"
    if not path.is_file():
        raise NanotuneError(f"no config.json in {folder}: this is not a Hugging Face model folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{path} is not valid JSON ({e}): restore or re-download it") from None
    if not isinstance(config, dict):
        raise NanotuneError(f"{path} holds a JSON {type(config).__name__}, not an object: restore or re-download it")
    if config.get("model_type") not in model_types:
        raise NanotuneError(f"{path} describes a {config.get('model_type')!r} model; this loader reads"
                            f" {', '.join(model_types)} (nanotune implements GPT-2, the Llama family and Gemma 3"
                            " for text generation, BERT for classification)")
    return config


def config_from_dict(cls, d: dict, source="config.json"):
    """Build a config dataclass from config.json; entries it does not know are kept in `extra`
    and written back unchanged on save, so nothing of the original config is lost. A known entry
    of the wrong type ("n_layer": "12") is refused here, not deep inside the model."""
    fields = {f.name: f.type for f in dataclasses.fields(cls) if f.name != "extra"}
    for name, value in d.items():
        if name in fields and not _fits(value, fields[name]):
            raise NanotuneError(f"{source}: {name!r} is {json.dumps(value)}, which is not {_describe(fields[name])}:"
                                " restore or re-download config.json")
    return cls(**{k: v for k, v in d.items() if k in fields}, extra={k: v for k, v in d.items() if k not in fields})


def _fits(value, annotation) -> bool:
    """Whether a JSON value fits a dataclass field's type (int | None, float, str, dict, list, ...)."""
    if isinstance(annotation, types.UnionType):
        return any(_fits(value, a) for a in annotation.__args__)
    if annotation is type(None):
        return value is None
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             list: "a list", type(None): "null"}
    parts = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    return " or ".join(names.get(a, a.__name__) for a in parts)


def check_sizes(config, names):
    """The sizes a model is built from must be positive whole numbers."""
    for name in names:
        if getattr(config, name) < 1:
            raise NanotuneError(f"config.json: {name!r} is {getattr(config, name)}; it must be at least 1:"
                                " restore or re-download config.json")


def config_to_dict(config) -> dict:
    d = dataclasses.asdict(config)
    return {**d.pop("extra"), **d}


def checkpoint_files(folder: Path) -> list:
    """The safetensors files of a checkpoint: one file, or the shards an index names."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise NanotuneError(f"{index} names shards that are not there ({', '.join(missing)}): download"
                                " the whole checkpoint again")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickled:
        raise NanotuneError(f"{folder} has only pickled weights ({', '.join(sorted(pickled))}); nanotune reads"
                            " safetensors only, because unpickling can run code: convert the checkpoint to"
                            " model.safetensors first")
    raise NanotuneError(f"no model.safetensors in {folder}: pass a folder with Hugging Face safetensors weights")


# safetensors dtype names -> torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def _read_header(f, file):
    """(header length, {key: dtype, shape, data_offsets}, file size), checked against the file's size."""
    try:
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len)) if 8 + header_len <= size else None
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
        if 8 + header_len + end > size or any(v["dtype"] not in DTYPES for v in entries.values()):
            raise ValueError(f"{size} bytes, the header describes {8 + header_len + end}")
    except (ValueError, AttributeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{file} is truncated or corrupt ({e}): download or save it again") from None
    return header_len, entries, size


def checkpoint_shapes(folder: Path) -> dict:
    """{tensor name: shape} of a checkpoint, read from the file headers only."""
    shapes = {}
    for file in checkpoint_files(folder):
        with open(file, "rb") as f:
            shapes.update({k: v["shape"] for k, v in _read_header(f, file)[1].items()})
    return shapes


def iter_checkpoint(folder: Path):
    """Yield (key, tensor) one tensor at a time, each file's header checked first.

    A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte
    range) and the raw bytes. The plain way to read one: `safetensors.torch.load_file`, every
    tensor copied into memory. Its twin, the mapped_checkpoint trick (tricks.mapped_tensors),
    maps the file and hands out views of its bytes, so a checkpoint is never resident twice.
    """
    for file in checkpoint_files(folder):
        with open(file, "rb") as f:
            header_len, entries, size = _read_header(f, file)
        if tricks.enabled("mapped_checkpoint"):
            yield from tricks.mapped_tensors(file, header_len, entries, size, DTYPES)
            continue
        yield from load_file(file).items()


def _short(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_weights(model, folder: Path, hub_to_name, from_hub=None, dtype=torch.float32, device="cpu",
                 optional=(), quantize=None) -> set:
    """Fill a model built on the meta device with the tensors of a checkpoint.

    `hub_to_name(key)` maps a checkpoint key to the model's parameter name (or None to skip it);
    `from_hub(name, tensor)` fixes a tensor's layout. Names that start with one of `optional`
    may be missing (a new head); they are returned so the caller can initialise them.
    `quantize` (a QuantConfig): swap the linear layers for 8/4-bit ones (quantize.py), each as soon
    as it is loaded (tricks.quantize_while_loading) or all of them afterwards (--plain).
    """
    from .quantize import check, quantize_linears
    streaming = quantize is not None and tricks.enabled("quantize_in_pieces")
    after_load = tricks.quantize_while_loading(model, quantize) if streaming else None
    to_quantize = check(model, quantize) if quantize is not None else None    # named before loading unties anything
    expected = dict(model.named_parameters())
    loaded, unexpected, wrong_shape = set(), [], []
    for key, tensor in iter_checkpoint(folder):
        name = hub_to_name(key)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if from_hub is not None:
            tensor = from_hub(name, tensor)
        if tensor.shape != expected[name].shape:
            wrong_shape.append(f"{key} {tuple(tensor.shape)} vs {tuple(expected[name].shape)}")
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        module_name, _, leaf = name.rpartition(".")
        parameter = torch.nn.Parameter(tensor.to(device), requires_grad=tensor.is_floating_point())
        setattr(model.get_submodule(module_name), leaf, parameter)
        loaded.add(name)
        if after_load is not None:
            after_load(name)
    not_loaded = set(expected) - loaded
    missing = {n for n in not_loaded if not n.startswith(tuple(optional))} if optional else not_loaded
    problems = [f"missing {_short(missing)}" if missing else "",
                f"unexpected {_short(unexpected)}" if unexpected else "",
                f"wrong shape {_short(wrong_shape)}" if wrong_shape else ""]
    if any(problems):
        raise NanotuneError(f"the weights in {folder} do not fit the {type(model).__name__} its config.json describes: "
                            + "; ".join(p for p in problems if p) + ". Check that config.json and the weights"
                                                                    " belong together")
    if quantize is not None and not streaming:
        quantize_linears(model, quantize, to_quantize)
    return not_loaded


def save_model(folder, config: dict, tensors: dict) -> None:
    """Write config.json and model.safetensors as `transformers` save_pretrained does."""
    folder = Path(folder)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    files.atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    files.write_json(config, folder / "config.json")
