"""Pick the model class from a checkpoint's config.json: GPT-2 generates text, BERT classifies."""
import torch

from . import hub
from .bert import BertClassifier
from .gpt2 import GPT2

TASKS = {"gpt2": "lm", "bert": "classify"}


def model_type(name_or_path) -> str:
    return hub.read_config(hub.resolve(name_or_path), tuple(TASKS))["model_type"]


def load_model(name_or_path, labels=None, dtype=torch.float32, device="cpu", quantize=None):
    """GPT2 for a gpt2 checkpoint; BertClassifier (with `labels`, if given) for a bert one."""
    if model_type(name_or_path) == "gpt2":
        return GPT2.from_pretrained(name_or_path, dtype=dtype, device=device, quantize=quantize)
    return BertClassifier.from_pretrained(name_or_path, labels=labels, dtype=dtype, device=device, quantize=quantize)
