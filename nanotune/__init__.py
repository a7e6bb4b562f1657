"""nanotune: fine-tune pre-trained GPT-2 and BERT checkpoints in plain PyTorch."""
from .bert import Bert, BertClassifier, BertConfig
from .errors import NanotuneError
from .gpt2 import GPT2, GPT2Config
from .tokenizer import Tokenizer, load_tokenizer
from .tricks import plain

__all__ = ["GPT2", "GPT2Config", "Bert", "BertClassifier", "BertConfig", "Tokenizer", "load_tokenizer",
           "NanotuneError", "plain"]
