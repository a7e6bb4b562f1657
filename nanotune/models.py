"""Pick the model class from a checkpoint's config.json: GPT-2, the Llama family (llama, qwen2,
mistral, qwen3) and Gemma 3 generate text, BERT classifies."""
import torch

from . import hub
from .bert import BertClassifier, BertConfig
from .errors import NanotuneError
from .gemma3 import Gemma3, Gemma3Config, text_config
from .gpt2 import GPT2, GPT2Config
from .llama import MODEL_TYPES, Llama, LlamaConfig

CLASSES = ({"gpt2": (GPT2, GPT2Config), "bert": (BertClassifier, BertConfig)}
           | {kind: (Llama, LlamaConfig) for kind in MODEL_TYPES}
           | {"gemma3_text": (Gemma3, Gemma3Config), "gemma3": (Gemma3, Gemma3Config)})     # gemma3: its text part
TASKS = {kind: "classify" if kind == "bert" else "lm" for kind in CLASSES}


def model_config(name_or_path) -> dict:
    """The checkpoint's config.json (found or downloaded), checked to be a model nanotune implements
    and to hold sizes of the right types, with the defaults of the entries it leaves out."""
    folder = hub.resolve(name_or_path)
    config = hub.read_config(folder, tuple(TASKS))
    config = text_config(config) if config["model_type"] == "gemma3" else config
    cls = CLASSES[config["model_type"]][1]
    return hub.config_to_dict(hub.config_from_dict(cls, config, folder / "config.json"))


def model_type(name_or_path) -> str:
    return hub.read_config(hub.resolve(name_or_path), tuple(TASKS))["model_type"]


def load_model(name_or_path, labels=None, dtype=torch.float32, device="cpu", quantize=None, new_head=False):
    """GPT2 or Llama for a language model; BertClassifier (with `labels`, if given) for a bert one."""
    cls = CLASSES[model_type(name_or_path)][0]
    if cls is not BertClassifier:
        return cls.from_pretrained(name_or_path, dtype=dtype, device=device, quantize=quantize)
    return BertClassifier.from_pretrained(name_or_path, labels=labels, dtype=dtype, device=device, quantize=quantize,
                                          new_head=new_head)


def check_tokenizer_fits(model, tokenizer, where):
    """Every id the tokenizer can produce must have a row in the model's embedding table; a larger
    vocabulary would index past it (an error on CPU, garbage or a crash on a GPU)."""
    # Gemma 3 1B's and 270M's tokenizer holds one more token than their 262,144 rows: <image_soft_token>,
    # a special token only the multimodal models' processor inserts; special tokens past the rows pass
    beyond = set(range(model.config.vocab_size, tokenizer.vocab_size)) - tokenizer.special_ids()
    if beyond:
        raise NanotuneError(f"the tokenizer of {where} has {tokenizer.vocab_size:,} tokens but the model's"
                            f" embedding has {model.config.vocab_size:,} rows: use the tokenizer that belongs"
                            " to this model")
    if tokenizer.eos_id is None and hasattr(model, "lm_head"):
        raise NanotuneError(f"the tokenizer of {where} has no end-of-text token, which a language model needs"
                            " to learn where a text ends")
