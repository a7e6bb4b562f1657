"""LoRA: train two small matrices beside each frozen linear layer instead of the layer itself.

    y = W x + b + (alpha / r) * B A x          A: (r, in), B: (out, r), r much smaller than in/out

W can be full precision or quantized (QLoRA). B starts at zero, so a fresh adapter changes
nothing. Adapters are saved in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`)
so `peft.PeftModel.from_pretrained` loads them, and can be merged into plain weights for export.
"""
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from . import files
from .dropout import Dropout
from .errors import NanotuneError
from .new_tokens import input_embedding, resize_token_embeddings, train_rows_only
from .quantize import dequantized_weight

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = {"gpt2": ("c_attn", "c_proj", "c_fc"), "bert": ("query", "key", "value", "dense"),
                   "llama": LLAMA_TARGETS, "qwen2": LLAMA_TARGETS, "mistral": LLAMA_TARGETS, "qwen3": LLAMA_TARGETS,
                   "gemma3_text": LLAMA_TARGETS, "gemma3": LLAMA_TARGETS}
HEADS = ("classifier",)          # trained in full alongside the adapter (PEFT's modules_to_save)
PEFT_PREFIX = "base_model.model."
TOKENS = ".token_adapter.trainable_tokens_delta"     # PEFT's key for trained embedding rows


@dataclass
class LoRAConfig:
    targets: tuple           # last names of the linear layers to adapt, e.g. ("c_attn", "c_proj", "c_fc")
    r: int = 8               # rank of the update B A
    alpha: float = 16        # the update is scaled by alpha / r
    dropout: float = 0.05    # on the adapter's input, during training
    trainable_tokens: tuple = ()   # ids whose embedding rows train too (new tokens; PEFT's trainable_token_indices)


class LoRALinear(nn.Module):
    def __init__(self, base_layer, r, alpha, dropout):
        super().__init__()
        self.base_layer = base_layer          # PEFT's name for the wrapped layer
        dtype = next((p.dtype for p in base_layer.parameters() if p.is_floating_point()), torch.float32)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # as nn.Linear and PEFT do
        nn.init.zeros_(self.lora_B.weight)                              # B = 0: starts as a no-op
        self.lora_dropout = Dropout(dropout)
        self.scaling = alpha / r
        self.enabled = True                   # off inside adapters_off: the base model alone

    def forward(self, x):
        if not self.enabled:
            return self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))        # B A x: rank r, then back to full width
        # Scaled within the addition: one full-width temporary fewer, so fewer large blocks for
        # malloc to place the small saved (..., r) tensors between (which leaves the heap in pieces).
        return torch.add(self.base_layer(x), update, alpha=self.scaling)

    def merged(self) -> nn.Linear:
        """A plain linear layer with W + (alpha / r) B A, de-quantized if the base was quantized."""
        base = self.base_layer
        update = self.lora_B.weight.float() @ self.lora_A.weight.float()          # (out, r) @ (r, in)
        weight = dequantized_weight(base).float() + update * self.scaling
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=self.lora_A.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if base.bias is not None:
                linear.bias.copy_(base.bias)
        return linear


def add_lora(model, cfg: LoRAConfig):
    """Freeze the model and wrap every linear layer named in `cfg.targets` (by its last name, as
    PEFT matches them) in a LoRALinear. A classification head stays trainable."""
    if cfg.r < 1:
        raise NanotuneError(f"--lora-r {cfg.r}: the adapter rank must be at least 1 (8 or 16 are common)")
    model.requires_grad_(False)
    linears = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_names = sorted(linears - {"lm_head"})
    found = set()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and isinstance(child, nn.Linear) and child_name != "lm_head":
                setattr(module, child_name, LoRALinear(child, cfg.r, cfg.alpha, cfg.dropout))
                found.add(child_name)
    unknown = sorted(set(cfg.targets) - found)
    if unknown:
        raise NanotuneError(f"--lora-targets {', '.join(unknown)}: no such linear layer in"
                            f" {type(model).__name__}; choose from {', '.join(linear_names)}")
    for head in HEADS:
        if hasattr(model, head):
            getattr(model, head).requires_grad_(True)
    if cfg.trainable_tokens:
        train_rows_only(input_embedding(model)[1], cfg.trainable_tokens)
    return model


@contextmanager
def adapters_off(model):
    """The model without its adapters, for as long as the block runs: the frozen base model, which
    preference tuning and RL use as their reference without a second copy in memory."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def merge_lora(model):
    """Fold every adapter into its layer: the model becomes plain (and de-quantized where LoRA was)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def save_adapter(model, folder, cfg: LoRAConfig, base_model_name, parameters=None):
    """The adapter alone, in PEFT's layout and key names. `parameters`: the trained parameters to
    write ({name: tensor}), if not the model's own (a copy frozen at the end of an epoch)."""
    folder = Path(folder)
    is_lm = hasattr(model, "lm_head")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM" if is_lm else "SEQ_CLS",
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none",
        "fan_in_fan_out": model.config.model_type == "gpt2",    # GPT-2's Hub weights are Conv1D: (in, out)
        "modules_to_save": None if is_lm else list(HEADS),
        "base_model_name_or_path": base_model_reference(base_model_name), "inference_mode": True,
        "init_lora_weights": True,
    }
    embedding_name, embedding = input_embedding(model)
    if parameters is None:
        parameters = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tensors = {PEFT_PREFIX + n: p.contiguous() for n, p in parameters.items() if n != embedding_name + ".weight"}
    if cfg.trainable_tokens:   # only the rows that trained, as PEFT keeps them: their values, by index
        rows = sorted(cfg.trainable_tokens)
        config["trainable_token_indices"] = {embedding_name.rpartition(".")[2]: rows}
        tensors[PEFT_PREFIX + embedding_name + TOKENS] = parameters[embedding_name + ".weight"][rows].contiguous()
    files.atomic_write(folder / "adapter_model.safetensors",
                       lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    files.write_json(config, folder / "adapter_config.json")


def read_adapter_config(folder) -> dict:
    """adapter_config.json, checked: a LoRA adapter with a rank, a scale and target layers."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise NanotuneError(f"no adapter_config.json in {folder}: pass a folder that train.py wrote with LoRA")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NanotuneError(f"{path} is not valid JSON ({e}): restore it, or train the adapter again") from None
    if not isinstance(config, dict):
        raise NanotuneError(f"{path} holds a JSON {type(config).__name__}, not an object: restore it, or"
                            " train the adapter again")
    if config.get("peft_type") != "LORA":
        raise NanotuneError(f"{path} is a {config.get('peft_type')} adapter; nanotune reads LoRA adapters")
    targets = config.get("target_modules")
    checks = {"r": isinstance(config.get("r"), int) and config["r"] >= 1,
              "lora_alpha": isinstance(config.get("lora_alpha"), (int, float)) and config["lora_alpha"] > 0,
              "target_modules": isinstance(targets, str)
              or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)),
              "base_model_name_or_path": isinstance(config.get("base_model_name_or_path", ""), str)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise NanotuneError(f"{path}: {', '.join(bad)} missing or of the wrong type: restore it, or train the"
                            " adapter again")
    return config


def base_model_reference(name_or_path) -> str:
    """How an adapter names its base model: a local folder as an absolute path (so the adapter
    loads from any working directory), a Hub id as it is."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def load_adapter(model, folder):
    """Add LoRA layers as `adapter_config.json` describes, and fill them (and a saved head) from
    `adapter_model.safetensors`, PEFT's layout."""
    config = read_adapter_config(folder)
    targets = config["target_modules"]
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    add_lora(model, LoRAConfig(targets, config["r"], config["lora_alpha"], 0.0))
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise NanotuneError(f"no adapter_model.safetensors in {folder}: nanotune reads safetensors adapters only")
    try:
        saved = load_file(str(path))
    except Exception as e:      # safetensors raises its own error type for a truncated or corrupt file
        raise NanotuneError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]}): save or train the"
                            " adapter again") from None
    tensors = {k.removeprefix(PEFT_PREFIX).replace(".default.", "."): v for k, v in saved.items()}
    embedding_name, embedding = input_embedding(model)
    rows = next(iter((config.get("trainable_token_indices") or {}).values()), None)
    values = tensors.pop(embedding_name + TOKENS, None)
    if rows is not None and values is not None:    # rows of new tokens: grow the embedding to hold them, then fill them
        resize_token_embeddings(model, max(rows) + 1)
        with torch.no_grad():
            embedding.weight[torch.tensor(rows)] = values.to(embedding.weight.dtype)
    params = dict(model.named_parameters())
    wanted = {n for n in params if ".lora_" in n}
    misfits = sorted(k for k in tensors if k not in params or params[k].shape != tensors[k].shape)
    problems = sorted(wanted - tensors.keys()) + misfits
    if problems:
        raise NanotuneError(f"the adapter in {folder} does not fit this model ({', '.join(problems[:3])}):"
                            " use the base model it was trained on")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return model
