"""BERT, the bidirectional encoder, and BertClassifier, BERT with a sequence-classification head.

Module names equal the Hugging Face checkpoint keys (`encoder.layer.0.attention.self.query.weight`,
...), so loading is nearly a straight copy; the differences live in `hub_to_name` below.
Shapes: B batch, T time, H hidden size, nh heads, hs head size.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import hub, tricks
from .dropout import Dropout
from .errors import NanotuneError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    id2label: dict | None = None        # {"0": "negative", ...}; set for classifiers
    label2id: dict | None = None
    model_type: str = "bert"
    extra: dict = field(default_factory=dict)   # the rest of config.json, kept for saving

    def __post_init__(self):
        hub.check_sizes(self, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size", "max_position_embeddings", "type_vocab_size"))
        if self.hidden_act not in ACTIVATIONS:
            raise NanotuneError(f"hidden_act {self.hidden_act!r} in config.json is not supported; use one of"
                                f" {', '.join(ACTIVATIONS)}")
        if self.position_embedding_type != "absolute":
            raise NanotuneError(f"position_embedding_type {self.position_embedding_type!r} is not supported;"
                                " nanotune's BERT uses absolute positions")
        if self.hidden_size % self.num_attention_heads:
            raise NanotuneError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads"
                                f" {self.num_attention_heads}")

    @property
    def context(self):
        return self.max_position_embeddings

    @property
    def labels(self):
        """Label names in id order, e.g. ["negative", "positive"] (None when the config has none)."""
        if not self.id2label:
            return None
        return [self.id2label[k] for k in sorted(self.id2label, key=int)]


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)   # sentence A / B
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, inputs_embeds=None):
        """`inputs_embeds` (B, T, H), given, replace the token embeddings looked up from `input_ids`
        (integrated gradients moves along a path between two of them)."""
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise NanotuneError(f"{T} tokens do not fit BERT's {self.position_embeddings.num_embeddings}"
                                " positions: truncate the input")
        positions = torch.arange(T, device=input_ids.device)[None]                # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        x = words + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))                                     # (B, T, H)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, mask):
        B, T, H = x.shape
        heads = lambda t: t.view(B, T, self.n_head, H // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), mask,
                      self.dropout_p if self.training else 0.0)                      # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H)                                    # (B, T, H)


def attention(q, k, v, mask, dropout_p):
    """softmax(q k^T / sqrt(hs)) v. Not causal: every token sees every real token, before and
    after it, which is what makes BERT's [CLS] vector a summary of the whole text. `mask`
    (B, 1, 1, T) is False at padding, which no query may look at (None: no padding)."""
    if tricks.enabled("attention"):
        return tricks.attention(q, k, v, mask, dropout_p)                 # the same in a fused kernel
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))              # (B, nh, T, T) scores
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))                       # no weight on padding
    att = F.softmax(att, dim=-1)                                          # each row: weights that sum to 1
    att = F.dropout(att, dropout_p)                                       # training: drop some weights (0 in eval)
    return att @ v                                                        # (B, nh, T, hs)


class BertOutput(nn.Module):
    """What the checkpoints call "output": project, dropout, add the residual, then LayerNorm (post-norm)."""

    def __init__(self, d_in, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = nn.ModuleDict({"self": BertSelfAttention(cfg), "output": BertOutput(cfg.hidden_size, cfg)})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.intermediate_size)})
        self.output = BertOutput(cfg.intermediate_size, cfg)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x, mask):
        x = self.attention["output"](self.attention["self"](x, mask), x)
        return self.output(self.act(self.intermediate["dense"](x)), x)


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.encoder = nn.ModuleDict({"layer": layers})
        self.pooler = nn.ModuleDict({"dense": nn.Linear(config.hidden_size, config.hidden_size)})
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        """The last hidden state (B, T, H)."""
        # (B, 1, 1, T): every query may look at every real (non-padding) key.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        for layer in self.encoder["layer"]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x

    def pool(self, hidden):
        """BERT's sentence vector: the [CLS] position through a dense layer and tanh."""
        return torch.tanh(self.pooler["dense"](hidden[:, 0]))

    # ---- Hub checkpoints -------------------------------------------------------------------
    @staticmethod
    def hub_to_name(key):
        """Checkpoint key -> Bert parameter name (None: not part of the encoder)."""
        key = key.removeprefix("bert.")                  # BertFor* checkpoints prefix the encoder
        if key.startswith(("cls.", "classifier.")) or key.endswith(("position_ids", "token_type_ids")):
            return None                                  # pre-training heads, a classifier, index buffers
        if key.endswith(".gamma"):                       # legacy LayerNorm names (bert-base-uncased)
            return key.removesuffix(".gamma") + ".weight"
        if key.endswith(".beta"):
            return key.removesuffix(".beta") + ".bias"
        return key

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu", quantize=None):
        """A Hub id or folder; `quantize` (a QuantConfig) swaps linear layers for 8/4-bit ones as they load."""
        return _from_pretrained(cls, name_or_path, dtype, device, quantize)

    def save_pretrained(self, folder):
        """Hub layout, as BertModel writes it."""
        config = hub.config_to_dict(self.config) | {"architectures": ["BertModel"]}
        hub.save_model(folder, config, self.state_dict())


class BertClassifier(nn.Module):
    """BERT + dropout + a linear layer on the pooled [CLS] vector: one score per label."""

    def __init__(self, config: BertConfig, num_labels: int = 2):
        super().__init__()
        self.config = config
        self.num_labels = num_labels
        self.bert = Bert(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        """Logits (B, num_labels)."""
        hidden = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds)
        return self.classifier(self.dropout(self.bert.pool(hidden)))

    @staticmethod
    def hub_to_name(key):
        if key.startswith("classifier."):
            return key
        name = Bert.hub_to_name(key)
        return None if name is None else "bert." + name

    @classmethod
    def from_pretrained(cls, name_or_path, num_labels=None, labels=None, dtype=torch.float32,
                        device="cpu", quantize=None,
                        new_head=False):
        """`labels` (names in id order) or `num_labels` set the head; by default the config's id2label,
        else 2. A checkpoint without a classifier gets a new, randomly initialised head, and so does
        one loaded with `new_head=True` (transfer learning: keep the body, replace the last layer)."""
        return _from_pretrained(cls, name_or_path, dtype, device, quantize, num_labels, labels, new_head)

    def save_pretrained(self, folder, state_dict=None):
        """Hub layout, as BertForSequenceClassification writes it (`state_dict`: gathered FSDP weights)."""
        config = hub.config_to_dict(self.config) | {"architectures": ["BertForSequenceClassification"],
                                                    "problem_type": "single_label_classification"}
        hub.save_model(folder, config, state_dict if state_dict is not None else self.state_dict())


def _head_labels(config, folder, name_or_path, labels, num_labels, new_head):
    """The label names, in id order, of the classifier head the model is built with. A head in the
    checkpoint is kept if it fits the labels asked for: the same names (in the checkpoint's order),
    or as many labels where the checkpoint's are only numbered (LABEL_0, LABEL_1, ...)."""
    saved = config.labels
    if labels is None:
        if saved and num_labels in (None, len(saved)):
            return saved
        return [f"LABEL_{i}" for i in range(num_labels or 2)]
    head = None if new_head else hub.checkpoint_shapes(folder).get("classifier.weight")
    if head is None:
        return list(labels)
    if saved and len(saved) == head[0] and set(labels) <= set(saved):
        return saved
    numbered = saved is None or saved == [f"LABEL_{i}" for i in range(len(saved))]
    if numbered and len(labels) == head[0]:
        return list(labels)
    theirs = ", ".join(saved) if saved and not numbered else f"{head[0]} numbered labels"
    raise NanotuneError(f"the data's labels ({', '.join(labels)}) are not those of the classifier head in"
                        f" {name_or_path} ({theirs}): add --new-head to replace the head with a new one for the"
                        " data's labels (the rest of the model is kept)")


def _from_pretrained(cls, name_or_path, dtype, device, quantize, num_labels=None, labels=None, new_head=False):
    folder = hub.resolve(name_or_path)
    config = hub.config_from_dict(BertConfig, hub.read_config(folder, ("bert",)), folder / "config.json")
    hub_to_name = cls.hub_to_name
    with torch.device("meta"):      # no memory for weights yet: the checkpoint fills them
        if cls is Bert:
            model = Bert(config)
        else:
            labels = _head_labels(config, folder, name_or_path, labels, num_labels, new_head)
            config.id2label = {str(i): name for i, name in enumerate(labels)}
            config.label2id = {name: i for i, name in enumerate(labels)}
            model = cls(config, len(labels))
            if new_head:    # the checkpoint's head is not loaded: a new one is made below
                hub_to_name = lambda key: None if key.startswith("classifier.") else cls.hub_to_name(key)
    new = hub.load_weights(model, folder, hub_to_name, dtype=dtype, device=device,
                           optional=("classifier.", "pooler.", "bert.pooler."), quantize=quantize)
    for module_name in sorted({n.rpartition(".")[0] for n in new}):   # a head the checkpoint does not have
        module = model.get_submodule(module_name).to_empty(device=device).to(dtype)
        nn.init.normal_(module.weight, std=config.initializer_range)
        nn.init.zeros_(module.bias)
        replaced = new_head and module_name == "classifier"
        why = "replaced by a new one (--new-head)" if replaced else "not in the checkpoint"
        print(f"nanotune: {module_name} is {why}; initialised it randomly (train it before use)")
    model.name_or_path = str(name_or_path)
    return model.eval()
