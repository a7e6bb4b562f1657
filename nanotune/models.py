"""Pick the model class from a checkpoint's config.json: GPT-2 generates text, BERT classifies."""
import torch

from . import hub
from .bert import BertClassifier, BertConfig
from .errors import NanotuneError
from .gpt2 import GPT2, GPT2Config

TASKS = {"gpt2": "lm", "bert": "classify"}


def model_config(name_or_path) -> dict:
    """The checkpoint's config.json (found or downloaded), checked to be a model nanotune implements
    and to hold sizes of the right types, with the defaults of the entries it leaves out."""
    folder = hub.resolve(name_or_path)
    config = hub.read_config(folder, tuple(TASKS))
    cls = GPT2Config if config["model_type"] == "gpt2" else BertConfig
    return hub.config_to_dict(hub.config_from_dict(cls, config, folder / "config.json"))


def model_type(name_or_path) -> str:
    return hub.read_config(hub.resolve(name_or_path), tuple(TASKS))["model_type"]


def load_model(name_or_path, labels=None, dtype=torch.float32, device="cpu", quantize=None, new_head=False):
    """GPT2 for a gpt2 checkpoint; BertClassifier (with `labels`, if given) for a bert one."""
    if model_type(name_or_path) == "gpt2":
        return GPT2.from_pretrained(name_or_path, dtype=dtype, device=device, quantize=quantize)
    return BertClassifier.from_pretrained(name_or_path, labels=labels, dtype=dtype, device=device, quantize=quantize,
                                          new_head=new_head)


def check_tokenizer_fits(model, tokenizer, where):
    """Every id the tokenizer can produce must have a row in the model's embedding table; a larger
    vocabulary would index past it (an error on CPU, garbage or a crash on a GPU)."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise NanotuneError(f"the tokenizer of {where} has {tokenizer.vocab_size:,} tokens but the model's"
                            f" embedding has {model.config.vocab_size:,} rows: use the tokenizer that belongs"
                            " to this model")
    if tokenizer.eos_id is None and model.config.model_type == "gpt2":
        raise NanotuneError(f"the tokenizer of {where} has no end-of-text token, which a language model needs"
                            " to learn where a text ends")
