"""train.py's command line: the flags, the checks that need more than one of them, and `start`,
which turns them into the Run (device, ranks, task, quantization, LoRA, what --out means) before
anything is loaded or written."""
import argparse
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import preference, tricks
from ..data import find_data_file
from ..errors import NanotuneError
from ..lora import DEFAULT_TARGETS, LoRAConfig
from ..models import TASKS, model_type
from ..quantize import QuantConfig
from ..recipes import RECIPES
from . import distributed, output
from .cli import ArgumentParser, add_plain_flag, device, native_bf16, number, text, whole_number


def layers_to_freeze(value):
    if value in ("embeddings", "body") or value.isdigit():
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: use embeddings, body, or a number of layers")


def parser():
    """Every flag is checked as it is read: a value out of range stops here, before any work."""
    p = ArgumentParser(description="Fine-tune a language model (GPT-2, the Llama family) or BERT (classification).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="gpt2", type=text("a Hub id or a model folder"),
                   help="Hub id or local folder of a GPT-2, Llama-family (llama, qwen2, mistral) or BERT checkpoint,"
                        " or a .gguf file")
    g.add_argument("--task", choices=["lm", "classify"], help="default: lm for GPT-2, classify for BERT")
    g.add_argument("--new-head", action="store_true",
                   help="classification: replace the checkpoint's classifier head with a new one for the data's labels")
    g.add_argument("--device", type=device, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True, metavar="FILE", type=text("a data file"),
                   help=".txt (one example a line), .jsonl, .csv or .tsv; repeat to mix several files"
                        " (also looked up in data/)")
    g.add_argument("--data-weights", type=number(0, low_open=True), nargs="+", metavar="W",
                   help="share of each --data file in the mix, e.g. 1 3")
    g.add_argument("--val-data", metavar="FILE", type=text("a data file"),
                   help="validation file (default: hold out --val-split of the training data)")
    g.add_argument("--val-split", type=number(0, 1, high_open=True), default=0.1,
                   help="fraction held out for validation when there is no --val-data; 0 for none")
    g.add_argument("--text-column", default="text", type=text("a column name"),
                   help="text field of .jsonl/.csv/.tsv files")
    g.add_argument("--label-column", default="label", type=text("a column name"),
                   help="label field of .jsonl/.csv/.tsv files (classification)")
    g.add_argument("--max-length", type=whole_number(2),
                   help="tokens per example (default: the model's context); longer LM texts are cut into windows,"
                        " longer classification texts truncated")
    g.add_argument("--pack", action="store_true",
                   help="LM: concatenate texts (EOS between) into full --max-length blocks, no padding;"
                        " conversations: whole ones side by side in blocks, none attending to another")
    g.add_argument("--group-by-length", action="store_true",
                   help="batches of examples of similar length: less padding, batches still in random order")
    g.add_argument("--stride", type=whole_number(1),
                   help="LM: cut long texts into windows this many tokens apart (default: --max-length, side by side);"
                        " a smaller stride overlaps them, so every token is scored once but with context from the"
                        " window before")
    g.add_argument("--truncate", choices=["head", "tail", "head+tail"], default="head",
                   help="classification: what to keep of a text longer than --max-length (head+tail: the first"
                        " quarter and the end)")
    g.add_argument("--chat-template", metavar="FILE", type=text("a template file or a built-in name"),
                   help="conversations: render them with this Jinja template (a file, or chatml) instead of the"
                        " model's own")
    g.add_argument("--train-on", choices=["answers", "strict", "all"], default="answers",
                   help="conversations: score the assistant's answers only (each with its end-of-turn token) where"
                        " training renders them as serving will, the others kept as context (answers); refuse a"
                        " conversation whose template renders an answer differently (strict); or every token (all)")
    g.add_argument("--tools", metavar="FILE", type=text("a JSON file"),
                   help="conversations: a JSON list of tool definitions (OpenAI's format) for the chat template,"
                        " for every conversation without its own 'tools'")
    g.add_argument("--enable-thinking", choices=["on", "off"],
                   help="conversations: the chat template's enable_thinking switch (Qwen3), set as it will be when"
                        " serving; the render check compares each answer with the prompt it gives")
    g.add_argument("--data-report", action="store_true",
                   help="print what the tokenizer makes of the data (split words, lengths, labels) and stop")
    g.add_argument("--add-tokens", metavar="TOKENS", type=text("tokens separated by commas, or a file"),
                   help="new whole tokens, e.g. \"<|user|>,<|bot|>\", or a file with one a line; the embedding grows"
                        " to match")
    g.add_argument("--pad-vocab-to-multiple-of", type=whole_number(1), metavar="N",
                   help="round the embedding's rows up to a multiple of N")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=whole_number(1), default=3)
    g.add_argument("--batch-size", type=whole_number(1), default=8, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=whole_number(1), default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=number(0, low_open=True), default=5e-5, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["linear", "cosine", "constant", "onecycle"], default="linear",
                   help="decay after warm-up; onecycle: up from lr/25 and down far below, as OneCycleLR")
    g.add_argument("--lr-decay", type=number(0, 1, low_open=True), metavar="F",
                   help="discriminative rates (ULMFiT): the head at --lr, each block below F times the one above,"
                        " the embeddings lowest")
    g.add_argument("--unfreeze", choices=["gradual"],
                   help="gradual: the first epoch trains the head only, each epoch after one more block down")
    g.add_argument("--warmup-steps", type=whole_number(0), default=0, help="optimizer steps of linear warm-up")
    g.add_argument("--weight-decay", type=number(0), default=0.01,
                   help="AdamW decoupled weight decay (linear-layer matrices only)")
    g.add_argument("--optim", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit: AdamW's two moments in 8 bits (bitsandbytes), 2 bytes of state a parameter"
                        " instead of 8")
    g.add_argument("--max-grad-norm", type=number(0), default=1.0,
                   help="clip the gradient norm to this; 0 turns clipping off")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true",
                           help="bfloat16 autocast for the forward pass (weights and optimizer stay fp32); the default"
                                " where the hardware multiplies bf16 natively")
    precision.add_argument("--fp32", action="store_true",
                           help="no bf16 autocast, even where the hardware has it: every product in fp32")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~30%% slower")
    g.add_argument("--freeze", metavar="WHAT", type=layers_to_freeze,
                   help="keep fixed: embeddings, N (embeddings + first N layers), or body (all but the head)")
    g.add_argument("--class-weights", choices=["balanced"], help="classification: weight each label by 1/frequency")
    g.add_argument("--label-smoothing", type=number(0, 1, high_open=True), default=0.0,
                   help="classification: target probability spread over all labels; preference pairs: the share"
                        " assumed labelled the wrong way round (conservative DPO)")
    g.add_argument("--patience", type=whole_number(1),
                   help="stop after this many epochs without a better validation loss")
    g.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=42, help="same seed, same data order, same run")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model across ranks (FSDP) instead of copying it (DDP)")
    g = p.add_argument_group("preference tuning (data with prompt, chosen and rejected fields)")
    g.add_argument("--beta", type=number(0, low_open=True), default=0.1,
                   help="DPO: how far from the reference the model may move (smaller: further)")
    g.add_argument("--dpo-loss", choices=["sigmoid", "ipo"], default="sigmoid",
                   help="sigmoid: DPO's -log sigmoid(beta * margin); ipo: (margin - 1/(2 beta))^2 on mean log-probs")
    g.add_argument("--reward-model", action="store_true",
                   help="train a reward model instead: a one-score head, -log sigmoid(score(chosen) - score(rejected)"
                        " - margin)")
    g = p.add_argument_group("LoRA and quantization (QLoRA)")
    g.add_argument("--quantize", choices=["8bit", "4bit"],
                   help="load the linear layers in 8 or 4 bits (bitsandbytes); trains LoRA adapters")
    g.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4", help="4-bit number format")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="4-bit: quantize the scales too")
    g.add_argument("--quantize-skip", default="lm_head,classifier", type=text("layer names, comma-separated"),
                   help="comma-separated layer names kept in full precision")
    g.add_argument("--lora-r", type=whole_number(0),
                   help="LoRA rank: train adapters instead of the whole model (default: 8 with --quantize, else off)")
    g.add_argument("--lora-alpha", type=number(0, low_open=True), default=16,
                   help="LoRA scale: the update is multiplied by alpha / r")
    g.add_argument("--lora-dropout", type=number(0, 1, high_open=True), default=0.05)
    g.add_argument("--lora-targets", type=text("layer names, comma-separated"),
                   help="comma-separated layer names (default: c_attn,c_proj,c_fc for GPT-2; q_proj,k_proj,v_proj,"
                        "o_proj,gate_proj,up_proj,down_proj for the Llama family; query,key,value,dense for BERT)")
    g.add_argument("--merge", action="store_true",
                   help="also write OUT/merged: the adapter folded into the (de-quantized) weights, a plain Hub model")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", type=text("a folder"),
                   help="folder for the model (Hub layout), metrics.jsonl and the training state")
    g.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out exactly where it stopped")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier nanotune run in --out (only the files nanotune wrote)")
    g.add_argument("--stop-after-epochs", type=whole_number(1), metavar="N",
                   help="stop (resumably) after N epochs, e.g. to fit a time limit")
    g = p.add_argument_group("see what you train")
    g.add_argument("--show-batch", nargs="?", const=2, type=whole_number(1), metavar="N",
                   help="print the first N (default 2) examples of the first batch as the model sees them, and stop")
    g.add_argument("--dry-run", action="store_true",
                   help="print the data report, the memory estimate and the first batch, and stop")
    g.add_argument("--show-groups", action="store_true",
                   help="print the optimizer's parameter groups (rate, decay, size) and stop")
    g.add_argument("--lr-find", action="store_true",
                   help="run an LR range test (OUT/lr_find.png and a table), suggest a rate, and stop")
    g.add_argument("--lr-find-check", action="store_true",
                   help="with --lr-find: also train a few steps at the suggestion and at a tenth of it")
    g = p.add_argument_group("hyper-parameter search")
    g.add_argument("--search", action="append", metavar="NAME=VALUES", type=text("NAME=V1,V2,... or NAME=LOW:HIGH"),
                   help="try these values of a flag, e.g. lr=1e-5,5e-5,1e-4 (a grid over every --search), or"
                        " lr=1e-6:1e-3 with --trials; each trial is a train.py run in OUT/search/, ranked by"
                        " validation loss; the best is kept in OUT")
    g.add_argument("--trials", type=whole_number(1, 1000),
                   metavar="N", help="draw N random settings from the --search values and ranges")
    g = p.add_argument_group("learning from rewards (GRPO; nanotune/rl.py)")
    g.add_argument("--reward", action="append", metavar="FILE.py:FUNCTION", type=text("FILE.py:FUNCTION"),
                   help="learn from this reward function, score(prompt, completion, **fields) -> float, instead of"
                        " from answers to copy; --data is then .jsonl prompts; repeat to add several")
    g.add_argument("--reward-weights", type=number(), nargs="+", metavar="W", help="one weight per --reward")
    g.add_argument("--group-size", type=whole_number(2), default=8,
                   help="answers sampled per prompt; each is judged against its group's mean")
    g.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group",
                   help="divide the advantages by the group's reward std (GRPO), the batch's, or not (Dr. GRPO)")
    g.add_argument("--loss-type", choices=["grpo", "dapo", "dr_grpo"], default="dapo",
                   help="how token losses are averaged: per answer then over answers (grpo), over all tokens of"
                        " the batch (dapo), or summed over answers x --max-new-tokens (dr_grpo)")
    g.add_argument("--epsilon", type=number(0, 1, low_open=True, high_open=True), default=0.2,
                   help="PPO clip: how far the probability of a token may move before a reused batch stops pushing")
    g.add_argument("--updates-per-batch", type=whole_number(1), default=1,
                   help="optimizer steps on each batch of answers (the clip matters from the second on)")
    g.add_argument("--kl-beta", type=number(0), default=0.0,
                   help="weight of the KL penalty to the starting model (under LoRA: its adapters off)")
    g.add_argument("--max-new-tokens", type=whole_number(1), default=64, help="the longest answer sampled")
    g.add_argument("--temperature", type=number(0, low_open=True), default=1.0, help="sampling temperature")
    g = p.add_argument_group("lm-eval after training (EleutherAI's lm-evaluation-harness, pip install lm-eval)")
    g.add_argument("--lm-eval", metavar="TASKS", type=text("task names or a task path"),
                   help="at the end, run these lm-eval tasks (names, or a task YAML or folder such as data/lm_eval)"
                        " on the best model; the scores go into OUT/metrics.jsonl")
    g.add_argument("--lm-eval-limit", type=number(0, low_open=True), metavar="N",
                   help="--lm-eval: only the first N examples of each task (below 1: that share of them)")
    g = p.add_argument_group("the book's recipes")
    g.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a chapter's settings (nanotune/recipes.py: rate, warm-up, decay, batch size, length,"
                        " epochs) for every one of those flags not given on the command line; prints what it set")
    add_plain_flag(p)
    return p


def parse_args(argv=None):
    args = parser().parse_args(argv)
    check_reward_flags(args)                         # before a recipe fills in flags of supervised training
    if args.recipe:
        fill_in_recipe(args, argv)
    return args


def fill_in_recipe(args, argv=None, say=print):
    """--recipe NAME: each of the recipe's train.py flags that the command line left out takes the
    recipe's value. Which flags the user gave is found by parsing again with those defaults unset,
    so abbreviations (--warm 10) and --flag=value count as given."""
    recipe = RECIPES[args.recipe]
    flags = [name for name in recipe if hasattr(args, name)]                # the rest are the scripts' own
    unset = object()
    again = parser()
    again.set_defaults(**dict.fromkeys(flags, unset))
    given = {name for name, value in vars(again.parse_args(argv)).items() if value is not unset}
    filled = [name for name in flags if name not in given]
    for name in filled:
        setattr(args, name, recipe[name])
    shown = " ".join(f"--{n.replace('_', '-')}" if recipe[n] is True else f"--{n.replace('_', '-')} {recipe[n]}"
                     for n in filled)
    say(f"recipe {args.recipe} (chapter {recipe['chapter']}): {shown or 'every flag was given'}")
    if "warmup_steps" in filled and recipe["warmup_steps"] >= 100:
        say(f"  --warmup-steps {recipe['warmup_steps']} is for the chapter's data set; on a small one it can be"
            " longer than the whole run (the rate never warms up): give about a tenth of the run's steps")
    return filled


# ---- checks that need more than one flag ---------------------------------------------------------

# Learning from rewards (--reward) runs its own loop, nanotune/rl.py, which reads some flags and not
# others; a flag that one kind of training would silently ignore is refused instead.
REWARD_ONLY = ("--reward-weights", "--group-size", "--scale-rewards", "--loss-type", "--epsilon",
               "--updates-per-batch", "--kl-beta", "--max-new-tokens", "--temperature")
NOT_WITH_REWARDS = ("--search", "--trials", "--recipe", "--data-weights", "--text-column", "--label-column",
                    "--max-length", "--pack", "--group-by-length", "--stride", "--truncate", "--train-on",
                    "--add-tokens", "--pad-vocab-to-multiple-of", "--grad-accum", "--lr-decay", "--unfreeze",
                    "--grad-checkpointing", "--freeze", "--class-weights", "--label-smoothing", "--patience",
                    "--fsdp", "--new-head", "--beta", "--dpo-loss", "--merge", "--data-report", "--show-batch",
                    "--dry-run", "--show-groups", "--lr-find", "--lr-find-check")


def check_reward_flags(args):
    """A flag given (not at its default) that the chosen kind of training does not read: one line naming it."""
    defaults, dest = parser(), lambda flag: flag[2:].replace("-", "_")
    given = [f for f in (NOT_WITH_REWARDS if args.reward else REWARD_ONLY)
             if getattr(args, dest(f)) != defaults.get_default(dest(f))]
    if given and args.reward:
        raise NanotuneError(f"{given[0]} does not apply to learning from rewards (--reward): leave it out")
    if given:
        raise NanotuneError(f"{given[0]} applies to learning from rewards only: add --reward FILE.py:FUNCTION,"
                            " or leave it out")

def check_settings(args, task):
    """Combinations that cannot work, refused before anything big is loaded."""
    if args.task and args.task != task:
        raise NanotuneError(f"--task {args.task} does not fit {args.model}: language models train as lm, BERT"
                            " models as classify")
    if task == "lm":
        for flag, given in (("--class-weights", args.class_weights), ("--label-smoothing", args.label_smoothing),
                            ("--new-head", args.new_head), ("--truncate", args.truncate != "head")):
            if given:
                raise NanotuneError(f"{flag} applies to classification, and {args.model} is a language model:"
                                    " leave it out")
    elif task == "classify":
        for flag, given in (("--pack", args.pack), ("--stride", args.stride)):
            if given:
                raise NanotuneError(f"{flag} applies to language modelling; {args.model} is a classifier: leave it out")
    if args.pack and args.stride:
        raise NanotuneError("--pack joins all texts into one stream of blocks; --stride overlaps the windows of each"
                            " long text: choose one")
    if args.lr_find_check and not args.lr_find:
        raise NanotuneError("--lr-find-check compares rates after an LR range test: add --lr-find")
    if args.unfreeze and distributed.world_size() > 1:
        raise NanotuneError("--unfreeze gradual changes what trains from epoch to epoch, which DDP does not allow:"
                            " run it in one process")
    if args.lm_eval_limit is not None and not args.lm_eval:
        raise NanotuneError("--lm-eval-limit shortens the tasks of --lm-eval: add --lm-eval TASKS")
    if args.lm_eval and task == "classify":
        raise NanotuneError(f"--lm-eval scores a language model, and {args.model} is a classifier: leave it out")
    if args.lm_eval and args.reward:
        raise NanotuneError("--lm-eval does not run after learning from rewards: leave it out, and afterwards run"
                            " generate.py --model OUT --lm-eval TASKS")
    if args.lm_eval:              # lm-eval is there and the tasks' data can be read: known now, not after training
        from ..tools.lm_eval import check_tasks
        check_tasks(args.lm_eval)
    if args.optim == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise NanotuneError("--optim adamw8bit needs bitsandbytes: pip install bitsandbytes")
    if args.optim == "adamw8bit" and args.reward:
        raise NanotuneError("--optim adamw8bit is for supervised and preference training; GRPO (--reward) steps with"
                            " AdamW: leave out --optim")
    if args.optim == "adamw8bit" and args.fsdp:
        raise NanotuneError("--optim adamw8bit does not step FSDP's sharded weights: leave out --fsdp or use adamw")
    if args.fsdp and (distributed.world_size() == 1 or args.lora_r or args.quantize):
        raise NanotuneError("--fsdp shards a full model across the ranks of a torchrun; it does not combine with LoRA"
                            " or --quantize (use DDP: leave --fsdp out)")


def lora_settings(args, kind):
    """(QuantConfig or None, LoRAConfig or None) from the command line."""
    r = args.lora_r if args.lora_r is not None else (8 if args.quantize else 0)
    if args.quantize and r == 0:
        raise NanotuneError("--quantize stores weights in 8 or 4 bits, which cannot be trained directly: train LoRA"
                            " adapters on them (--lora-r 8)")
    if args.merge and not r:
        raise NanotuneError("--merge folds a LoRA adapter into the model: use it with --lora-r or --quantize")
    compute = torch.bfloat16 if args.bf16 else torch.float32
    skip = tuple(args.quantize_skip.split(","))
    quant = QuantConfig(args.quantize, args.quant_type, args.double_quant, compute, skip) if args.quantize else None
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else DEFAULT_TARGETS[kind]
    return quant, (LoRAConfig(targets, r, args.lora_alpha, args.lora_dropout) if r else None)


def local_inputs(args):
    """The local files and folders the run reads: --out must not hold them."""
    model = Path(args.model).expanduser()
    return ([("--model", model if model.exists() else None)] + [("--data", find_data_file(f)) for f in args.data]
            + ([("--val-data", find_data_file(args.val_data))] if args.val_data else []))


def context_length(args, config, task):
    """--max-length, checked against the model's context (its default)."""
    context = config.get("n_positions") or config["max_position_embeddings"]      # GPT-2's name, everyone else's
    max_length = args.max_length or context
    if max_length > context:
        raise NanotuneError(f"--max-length {max_length} is more than the model's {context} positions: use at"
                            f" most {context}")
    if args.stride and args.stride > max_length:
        raise NanotuneError(f"--stride {args.stride} is more than the windows' {max_length} tokens: the"
                            f" windows would skip tokens; use at most {max_length}")
    if task == "classify" and max_length < 3:
        raise NanotuneError(f"--max-length {max_length} leaves no room for text between [CLS] and [SEP]: use"
                            " at least 3")
    return max_length


def check_flags(args):
    """(model type, task, QuantConfig, LoRAConfig, what starting in --out means) with every flag
    checked against the others, the model's config.json and --out; reads, writes nothing."""
    kind = model_type(args.model)                            # finds the checkpoint and reads its config.json
    task = preference.task_of(args, TASKS[kind])             # data of chosen and rejected answers: dpo
    check_settings(args, task)
    looking_only = args.data_report or args.dry_run or args.show_batch or args.show_groups   # these write nothing
    start = None if looking_only else output.check(args.out, args.resume, args.overwrite, local_inputs(args))
    quant, lora = lora_settings(args, kind)
    return kind, task, quant, lora, start


@dataclass
class Run:
    """What the flags decided: where the run computes, on how many ranks, what it trains."""
    device: torch.device
    rank: int
    world: int
    bf16: bool
    kind: str                # the checkpoint's model_type: gpt2, bert
    task: str                # lm, classify or dpo
    quant: QuantConfig | None
    lora: LoRAConfig | None
    start: str | None        # what --out means: new, resume, restart, overwrite (None: nothing is written)

    @property
    def main_process(self):
        return self.rank == 0                               # the one that prints and writes

    def print(self, *args, **kwargs):
        if self.main_process:
            print(*args, **kwargs)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)


def start(args) -> Run:
    """The process set up for the run (speed tricks, ranks, seed, precision) and the flags checked."""
    if args.plain:
        tricks.turn_off(args.plain)                          # the textbook version of every step
    device, rank, world = distributed.setup(args.device)     # several ranks when started by torchrun
    if device.type == "cpu" and tricks.enabled("keep_freed_memory"):
        tricks.keep_freed_memory()                           # each step reuses the last step's memory
    torch.manual_seed(args.seed)
    # bf16 autocast where the hardware multiplies bf16 natively: the matrix products run 2-3x faster,
    # and fine-tuning reaches the same loss, because only the products round to bf16's 8-bit
    # mantissa while the weights, their gradients and AdamW's moments stay fp32.
    args.bf16 = args.bf16 or (not args.fp32 and native_bf16(device))
    kind, task, quant, lora, start = check_flags(args)
    return Run(device, rank, world, args.bf16, kind, task, quant, lora, start)
