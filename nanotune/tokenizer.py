"""Text <-> token ids with the `tokenizers` library, plus the few special ids training needs.

A Hub repo's `tokenizer.json` holds the whole pipeline (normaliser, pre-tokeniser, model,
post-processor). Older repos ship only the classic files; those are rebuilt here:
`vocab.json` + `merges.txt` (GPT-2's byte-level BPE) or `vocab.txt` (BERT's WordPiece).
"""
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from . import files, hub
from .errors import NanotuneError

EXTRA_FILES = ("tokenizer_config.json", "special_tokens_map.json")   # copied along on save
TEMPLATE_FILE = "chat_template.jinja"                                # the chat template, where there is one


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, specials: dict, folder: Path | None = None, chat_template=None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template     # the Jinja source that writes a conversation out (chat.py)
        self.tokenizer.no_padding()       # a tokenizer.json may carry its own settings; we pad and
        self.tokenizer.no_truncation()    # truncate explicitly, per call
        self.folder = folder
        vocab = tokenizer.get_vocab()
        find = lambda *names: next((vocab[n] for n in names if n in vocab), None)
        self.eos_id = find(specials.get("eos_token"), "<|endoftext|>", "[SEP]", "</s>")
        self.bos_id = find(specials.get("bos_token"), "<|endoftext|>", "[CLS]", "<s>")
        # GPT-2 has no padding token: pad with EOS. Padding is then told apart by the attention
        # mask (by position), never by the id, because a real EOS must stay a label.
        self.pad_id = find(specials.get("pad_token"), "[PAD]", "<pad>")
        if self.pad_id is None:
            self.pad_id = self.eos_id

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens=True) -> list:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=True) -> list:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def special_ids(self) -> set:
        """The ids of the special tokens (`<|im_end|>`, `[CLS]`, ...): added tokens marked special."""
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}

    def decode(self, ids, skip_special_tokens=True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def pad(self, sequences, side="right"):
        return pad(sequences, self.pad_id, side)

    def __call__(self, texts, max_length=None, side="right"):
        """Encode a batch with truncation and dynamic padding (to the longest text, not a fixed size)."""
        if max_length is not None:
            self.tokenizer.enable_truncation(max_length)   # keeps [CLS] ... [SEP] intact
        try:
            sequences = self.encode_batch(texts)
        finally:
            self.tokenizer.no_truncation()
        return self.pad(sequences, side)

    def save(self, folder):
        folder = Path(folder)
        files.atomic_write(folder / "tokenizer.json", lambda tmp: self.tokenizer.save(tmp))
        for name in EXTRA_FILES:
            if self.folder is not None and (self.folder / name).is_file() and self.folder.resolve() != folder.resolve():
                files.copy_file(self.folder / name, folder / name)
        if self.chat_template:
            files.atomic_write(folder / TEMPLATE_FILE,
                               lambda tmp: Path(tmp).write_text(self.chat_template, encoding="utf-8"))


def pad(sequences, pad_id, side="right"):
    """Pad id lists to the longest one: (input_ids, attention_mask), both (B, T) long tensors.
    Right padding for training; left padding for generation, so every prompt ends at the same place."""
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        span = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        input_ids[i, span] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids, attention_mask


def _specials(folder: Path) -> dict:
    """Special tokens named in tokenizer_config.json / special_tokens_map.json, as plain strings."""
    found = {}
    for name in EXTRA_FILES:
        if (folder / name).is_file():
            for key, value in json.loads((folder / name).read_text(encoding="utf-8")).items():
                if key.endswith("_token") and value:
                    found.setdefault(key, value["content"] if isinstance(value, dict) else value)
    return found


def _byte_level_bpe(folder: Path) -> HFTokenizer:
    """GPT-2's tokenizer from vocab.json + merges.txt."""
    tk = HFTokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    if "<|endoftext|>" in tk.get_vocab():
        tk.add_special_tokens(["<|endoftext|>"])
    return tk


def _wordpiece(folder: Path, lowercase: bool) -> HFTokenizer:
    """BERT's tokenizer from vocab.txt: clean, (lower-case and strip accents), split, WordPiece,
    then wrap as [CLS] A [SEP] (B [SEP])."""
    tk = HFTokenizer(models.WordPiece.from_file(str(folder / "vocab.txt"), unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece(prefix="##")
    tk.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                      special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tk


def load_tokenizer(name_or_path) -> Tokenizer:
    """The tokenizer of a model: a folder or a Hub id."""
    folder = hub.resolve(name_or_path)
    specials = _specials(folder)
    try:
        if (folder / "tokenizer.json").is_file():
            tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            tk = _byte_level_bpe(folder)
        elif (folder / "vocab.txt").is_file():
            settings = folder / "tokenizer_config.json"
            config = json.loads(settings.read_text()) if settings.is_file() else {}
            tk = _wordpiece(folder, lowercase=config.get("do_lower_case", True))
        elif (folder / "tokenizer.model").is_file():      # SentencePiece's own file (older Gemma, Llama 2 repos)
            raise NanotuneError(f"{folder} has a SentencePiece tokenizer.model and no tokenizer.json; nanotune reads"
                                " tokenizer.json: write one with transformers (AutoTokenizer.from_pretrained(folder)"
                                ".save_pretrained(folder)) or download the repo's tokenizer.json")
        else:
            raise NanotuneError(f"no tokenizer in {folder}: expected tokenizer.json, vocab.json + merges.txt,"
                                " or vocab.txt")
    except Exception as e:
        if isinstance(e, NanotuneError):
            raise
        raise NanotuneError(f"the tokenizer files in {folder} could not be read ({e}): restore or re-download"
                            " them") from None
    if tk.get_vocab_size() == 0:
        raise NanotuneError(f"the tokenizer in {folder} has an empty vocabulary: restore or re-download its files")
    from .chat import read_template
    return Tokenizer(tk, specials, folder, read_template(folder))
