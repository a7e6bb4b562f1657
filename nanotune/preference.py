"""Preference tuning: teach a model which of two answers is better (DPO), not just to imitate one.

Supervised fine-tuning raises the probability of the answers it is shown. Preference data gives,
for each prompt, a chosen answer and a rejected one, and DPO (Direct Preference Optimization,
Rafailov et al., 2023) trains the model so that, measured against a frozen reference (the model
before this training), the chosen answer gains probability relative to the rejected one:

    reward(y) = beta * (log p_model(y | x) - log p_ref(y | x))        the "implicit reward"
    loss      = -log sigmoid(reward(chosen) - reward(rejected))

It is the reward model's loss (Bradley-Terry: P(chosen beats rejected) = sigmoid of the
difference of the rewards) with the reward written through the policy itself, so no separate
reward model and no sampling are needed: one classification-like loss over log-probabilities.
The reference keeps the model close to where it started (beta: how close; smaller lets it move
further). At the first step the model is the reference, every reward is 0 and the loss is ln 2.

The rows: {"prompt", "chosen", "rejected"} (and optionally "margin", for the reward model), each a
string (plain text), or for chat models TRL's conversational format: "prompt" a list of messages,
"chosen" / "rejected" an assistant message or a list of messages. The prompt is rendered with the
model's chat template and its generation prompt, each answer as the text that follows it, so that
the ids scored are exactly what the model would write after that prompt.
"""
import json
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import ChatTemplate, check_conversation, read_template
from .errors import NanotuneError
from .losses import IGNORE, next_token_labels

FIELDS = ("prompt", "chosen", "rejected")
TASKS = ("dpo", "reward")              # what train.py calls the tasks that train on pairs: DPO, a reward model


# ---- reading and rendering the pairs --------------------------------------------------------------

def batch_kind(task):
    """data.make_batch's name for a task's batches: DPO and a reward model batch pairs alike."""
    return "dpo" if task in TASKS else task


def is_pair_row(row) -> bool:
    """A .jsonl row of preference data: it has a chosen and a rejected answer."""
    return isinstance(row, dict) and "chosen" in row and "rejected" in row


def task_of(args, task):
    """"dpo" when the first --data file holds preference pairs (told by its first row's fields), else
    `task`; the flags that make no sense for pairs are refused here."""
    from .data import find_data_file
    if args.reward_model and args.reward:
        raise NanotuneError("--reward-model trains a reward model on pairs, --reward learns from reward functions"
                            " (GRPO): give one of them")
    path = find_data_file(args.data[0])
    first = None
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), None)
    try:
        pairs = first is not None and is_pair_row(json.loads(first))
    except json.JSONDecodeError:
        pairs = False                           # read_examples reports the line
    if not pairs:
        if args.reward_model:
            raise NanotuneError(f"--reward-model trains on preference pairs, and {path} holds none (no \"chosen\" and"
                                " \"rejected\" fields): give a .jsonl of pairs")
        return task
    if task != "lm":
        raise NanotuneError(f"{path} holds preference pairs, which train a language model, and {args.model} is a"
                            " classifier: give a GPT-2 or Llama-family model")
    for flag, given in (("--pack", args.pack), ("--stride", args.stride), ("--class-weights", args.class_weights),
                        ("--new-head", args.new_head), ("--truncate", args.truncate != "head"),
                        ("--train-on", args.train_on != "answers")):
        if given:
            raise NanotuneError(f"{flag} does not apply to preference pairs (each pair is scored on its two answers"
                                " whole): leave it out")
    if args.dpo_loss == "ipo" and args.label_smoothing:
        raise NanotuneError("--label-smoothing is conservative DPO's (--dpo-loss sigmoid); IPO has no labels to"
                            " smooth: leave one out")
    if args.reward_model:
        for flag, given in (("--beta", args.beta != 0.1), ("--dpo-loss", args.dpo_loss != "sigmoid"),
                            ("--label-smoothing", args.label_smoothing)):
            if given:
                raise NanotuneError(f"{flag} is DPO's, and --reward-model trains a reward model: leave it out")
        if args.merge:
            raise NanotuneError("--merge writes a language model, and a reward model's head is saved beside its"
                                " adapter (score.safetensors): leave --merge out, generate.py loads the adapter")
        return "reward"
    return "dpo"


def as_messages(part, role):
    """A prompt or an answer as a list of messages: a string becomes one message of `role`."""
    if isinstance(part, str):
        return [{"role": role, "content": part}]
    return [part] if isinstance(part, dict) else part


def read_pairs(path, rows) -> list:
    """The preference rows of a .jsonl file, checked: every field there, answers not empty and not
    equal, one format (text or conversations) a file. Each bad row is named by its line."""
    examples = []
    for where, row in rows:
        missing = [k for k in FIELDS if row.get(k) in (None, "", [])]
        if missing:
            raise NanotuneError(f"{path} {where} has no {' or '.join(map(repr, missing))}: every preference row needs"
                                " a prompt, a chosen and a rejected answer")
        chat = any(not isinstance(row[k], str) for k in FIELDS)
        if examples and chat != examples[0]["chat"]:
            raise NanotuneError(f"{path} {where} mixes plain text and conversations with the lines before it: keep"
                                " one format a file")
        if chat:
            prompt = as_messages(row["prompt"], "user")
            answers = []
            for k in ("chosen", "rejected"):
                if not isinstance(row[k], (str, dict, list)) or not isinstance(prompt, list):
                    raise NanotuneError(f"{path} {where}: {k!r} is {json.dumps(row[k])[:40]}: give a string, a"
                                        " message, or a list of messages")
                conversation = check_conversation(prompt + as_messages(row[k], "assistant"), f"{path} {where}")
                answers.append(conversation[len(prompt):])
            prompt = conversation[:len(prompt)]
            if not all(m["content"].strip() for answer in answers for m in answer):
                raise NanotuneError(f"{path} {where} has an empty answer: give both answers some text")
        else:
            prompt, answers = row["prompt"], [row["chosen"], row["rejected"]]
            if not all(a.strip() for a in answers):
                raise NanotuneError(f"{path} {where} has an empty answer: give both answers some text")
        if answers[0] == answers[1]:
            raise NanotuneError(f"{path} {where}: the chosen and the rejected answer are the same, so there is no"
                                " preference to learn: fix or drop the row")
        margin = row.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise NanotuneError(f"{path} {where}: 'margin' is {json.dumps(margin)[:40]}, not a number")
        examples.append({"prompt": prompt, "chosen": answers[0], "rejected": answers[1], "margin": float(margin),
                         "chat": chat, "where": f"{path} {where}"})
    if not examples:
        raise NanotuneError(f"data file {path} holds no preference pairs")
    return examples


def render_pairs(train_examples, val_examples, tokenizer, model_name, choice=None, train_on="answers"):
    """Each pair's prompt and answers as text: conversations through the model's chat template
    (--chat-template overrides it), the prompt with the generation prompt that opens the assistant's
    turn, each answer as what the template writes after it (up to and including its end-of-turn
    token). Plain text: the prompt, and each answer followed by the end-of-text token when
    tokenized. Sets "text" (prompt + chosen) for the data report; returns the template or None."""
    template = None
    if any(e["chat"] for e in train_examples + val_examples):
        source = read_template(None, choice) if choice else tokenizer.chat_template
        if source is None:
            raise NanotuneError(f"{model_name} has no chat template to write conversations with: give one with"
                                " --chat-template FILE, or --chat-template chatml")
        template = ChatTemplate(source, tokenizer)
    elif choice:
        raise NanotuneError("--chat-template applies to conversations, and these pairs are plain text: leave it out")
    for e in train_examples + val_examples:
        if not e["chat"]:
            e["prompt_text"], e["chosen_text"], e["rejected_text"] = e["prompt"], e["chosen"], e["rejected"]
        else:
            e["prompt_text"] = template.render(e["prompt"], add_generation_prompt=True)
            for k in ("chosen", "rejected"):
                full = template.render(e["prompt"] + e[k])
                if not full.startswith(e["prompt_text"]):
                    raise NanotuneError(f"{e['where']}: the chat template does not write the answer after the prompt"
                                        " it writes alone (it changes earlier turns): give another with"
                                        " --chat-template")
                # the answer and its end-of-turn token, not the newline a template may put after it
                e[k + "_text"] = full[len(e["prompt_text"]):].rstrip()
        e["text"] = e["prompt_text"] + e["chosen_text"]
    return template


@dataclass
class Pair:
    """A prompt's ids and its two answers' ids; the reference model's log-probabilities of both
    answers once computed before training (None: computed at each step, with the adapters off)."""
    prompt: list
    chosen: list
    rejected: list
    margin: float = 0.0
    ref: tuple | None = None

    def __len__(self):              # the width its rows need in a batch
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def tokenize_pairs(examples, tokenizer, max_length):
    """(pairs, None, how many answers were cut to fit --max-length). A prompt that leaves no room
    for an answer stops the run with its line. Conversations are encoded without adding special
    tokens (the template writes its own, as apply_chat_template does); plain text as any text,
    each answer ending with the end-of-text token, so the model learns to stop."""
    pairs, cut = [], 0
    for e in examples:
        prompt = tokenizer.encode(e["prompt_text"], add_special_tokens=not e["chat"])
        ends = [] if e["chat"] else [tokenizer.eos_id]
        answers = [tokenizer.encode(e[k + "_text"], add_special_tokens=False) + ends for k in ("chosen", "rejected")]
        if len(prompt) >= max_length:
            raise NanotuneError(f"{e['where']}: the prompt is {len(prompt)} tokens, which leaves no room for an answer"
                                f" under --max-length {max_length}: shorten it, or raise --max-length")
        room = max_length - len(prompt)
        cut += any(len(a) > room for a in answers)
        pairs.append(Pair(prompt, answers[0][:room], answers[1][:room], e["margin"]))
    return pairs, None, cut


# ---- the loss ----------------------------------------------------------------------------------

def sequence_logps(logits, labels, mask):
    """log p(answer | prompt) of each row: the sum over the answer's tokens of log p(token | what
    precedes it). logits (B, T, V); labels (B, T): the token that came next at each position (the
    ids shifted one place left); mask (B, T): 1 where that token belongs to the answer."""
    logps = logits.float().log_softmax(-1)                                 # (B, T, V), in fp32 (as the LM loss)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)   # (B, T): log p of the true token
    return (picked * mask).sum(-1)                                         # (B,): prompt and padding count 0


def answer_logps(model, batch):
    """(log-probabilities of each row's answer (2B,), tokens in each answer (2B,)) for a pair batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])            # (2B, T, V)
    labels = next_token_labels(batch["labels"])                            # position t predicts token t + 1
    mask = labels != IGNORE
    return sequence_logps(logits, labels, mask), mask.sum(-1)


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0,
             kind="sigmoid"):
    """The DPO loss of each pair, and the implicit rewards of its two answers.

    kind "sigmoid": DPO (Rafailov et al. 2023, eq. 7); with label_smoothing e, conservative DPO
    (Mitchell 2023), which assumes a share e of the pairs are labelled the wrong way round.
    kind "ipo": IPO (Azar et al. 2023, eq. 17), a squared loss that stops pushing once the margin
    reaches 1 / (2 beta), where DPO's keeps pushing towards an infinite margin."""
    # How much more the model prefers chosen over rejected than the reference does (in nats)
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if kind == "sigmoid":
        # -log P(chosen beats rejected), P = sigmoid(beta * logits) (Bradley-Terry), the labels smoothed
        losses = -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    elif kind == "ipo":
        # regress the margin onto 1 / (2 beta): a target, so the loss cannot be driven to 0 by over-fitting
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r}")
    # The rewards are read, not trained: beta times how far each answer moved from the reference
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def loss_sum(model, batch, task="dpo", beta=0.1, kind="sigmoid", label_smoothing=0.0):
    """The summed loss of a batch of pairs (train.py divides by the pairs of the step): DPO's, or
    for task "reward" the reward model's (reward_loss_sum). The
    chosen and rejected rows go through the model in one forward pass; the reference's
    log-probabilities come with the batch (computed once before training), or, under LoRA, from
    the same model with its adapters off. The batch's scores are left in batch["metrics"] (sums
    over its pairs, TRL's names), for the log."""
    if task == "reward":
        return reward_loss_sum(model, batch)
    logps, tokens = answer_logps(model, batch)
    ref = batch.get("ref_logps")
    if ref is None:
        from .lora import adapters_off
        with torch.no_grad(), adapters_off(model):
            ref = answer_logps(model, batch)[0]
    if kind == "ipo":       # IPO compares the answers' mean log-probability per token (as TRL does)
        logps, ref = logps / tokens, ref / tokens
    chosen, rejected = logps.chunk(2)                                      # the chosen rows come first
    ref_chosen, ref_rejected = ref.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta,
                                                        label_smoothing, kind)
    batch["metrics"] = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                        "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
    return losses.sum()


def loss_options(args, task):
    """The loss's settings from the flags, for train.loss_sum (none for other tasks)."""
    return dict(beta=args.beta, kind=args.dpo_loss) if task in TASKS else {}


def reward_loss(chosen_scores, rejected_scores, margin=None):
    """The reward model's loss of each pair: -log P(chosen beats rejected), with P = sigmoid of the
    difference of the scores (Bradley-Terry, as in InstructGPT); a margin (Llama 2) asks the
    chosen score to lead by at least that much where the raters said one answer was much better."""
    difference = chosen_scores - rejected_scores - (0.0 if margin is None else margin)
    return -F.logsigmoid(difference)


# ---- a reward model: the language model with a one-score head ------------------------------------

def add_score_head(model):
    """A reward model from a language model: a linear layer from the last hidden state to one
    number, beside the LM head (transformers' *ForSequenceClassification with num_labels=1 calls it
    `score` and gives it no bias: a constant added to every score cancels in every difference).
    Small random weights, as transformers starts it (initializer_range 0.02): scores near 0 at first."""
    hidden = getattr(model.config, "hidden_size", None) or model.config.n_embd        # Llama's name, GPT-2's
    weight = next(model.parameters())
    model.score = nn.Linear(hidden, 1, bias=False, device=weight.device, dtype=weight.dtype)
    nn.init.normal_(model.score.weight, std=0.02)
    return model


def scores(model, batch):
    """Each row's score (2B,): the head on the hidden state of the row's last answer token, the one
    that has read the whole prompt and answer (a causal model's earlier positions have not)."""
    hidden = model(batch["input_ids"], batch["attention_mask"], output_layer=False)     # (2B, T, C)
    answer = batch["labels"] != IGNORE                                                   # (2B, T)
    positions = torch.arange(answer.size(1), device=answer.device)
    last = (positions * answer).argmax(-1)                                               # (2B,): wherever padding is
    return model.score(hidden[torch.arange(len(last), device=last.device), last]).squeeze(-1).float()


def reward_loss_sum(model, batch):
    """The reward model's summed loss over a batch of pairs (no reference: the scores are the
    rewards), and its scores under RewardTrainer's names, summed over the pairs, in batch["metrics"]."""
    chosen, rejected = scores(model, batch).chunk(2)                                    # the chosen rows come first
    losses = reward_loss(chosen, rejected, batch["margin"].to(chosen.dtype))
    chosen, rejected = chosen.detach(), rejected.detach()
    batch["metrics"] = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).sum(),
                        "mean_reward": ((chosen + rejected) / 2).sum()}
    return losses.sum()


SCORE_FILE = "score.safetensors"


def save_score_head(model, out, weights, lora):
    """A reward model's head goes to OUT/score.safetensors, beside the model (or adapter) saved as
    usual, which then loads anywhere a language model does. Returns what to save of the rest:
    `weights` (or, when None, the model's own tensors) without the head; `weights` unchanged for a
    model without one."""
    if not hasattr(model, "score"):
        return weights
    from safetensors.torch import save_file

    from .files import atomic_write
    if weights is None:
        weights = ({n: p.detach() for n, p in model.named_parameters() if p.requires_grad} if lora
                   else model.state_dict())
    weights = dict(weights)
    head = {"score.weight": weights.pop("score.weight").contiguous()}
    atomic_write(out / SCORE_FILE, lambda tmp: save_file(head, tmp, metadata={"format": "pt"}))
    return weights


def load_score_head(model, folder):
    """The saved head of a reward model in `folder`, on the model; False when there is none."""
    from pathlib import Path

    from safetensors.torch import load_file
    path = Path(folder) / SCORE_FILE
    if not path.is_file():
        return False
    weight = load_file(str(path))["score.weight"]
    add_score_head(model)
    if model.score.weight.shape != weight.shape:
        raise NanotuneError(f"{path} holds a head for hidden states of {weight.shape[1]}, and the model's are"
                            f" {model.score.weight.shape[1]}: use the base model it was trained on")
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return True


@torch.no_grad()
def score_answers(model, tokenizer, rows, batch_size=8):
    """A reward model's score of each {"prompt", "answer"} row, the answer rendered after the prompt
    exactly as in training (strings as plain text, messages through the model's chat template).
    Each row goes through read_pairs' checks and rendering as the chosen answer of a pair (its
    rejected answer a copy, whose score is left unread)."""
    from .data import batch_order, make_batch
    rows = [(f"item {i}", {"prompt": r.get("prompt"), "chosen": r.get("answer"), "rejected": r.get("answer")})
            for i, r in enumerate(rows)]
    examples = []
    for where, row in rows:        # read_pairs would refuse equal answers, which is all these pairs have
        missing = [k for k in ("prompt", "answer") if row[k if k == "prompt" else "chosen"] in (None, "", [])]
        if missing:
            raise NanotuneError(f"input {where} has no {' or '.join(map(repr, missing))}: give each a prompt and an"
                                " answer")
        examples += read_pairs("input", [(where, row | {"rejected": "\u241e"})])
        examples[-1]["rejected"] = examples[-1]["chosen"]
    render_pairs(examples, [], tokenizer, "the model")
    pairs = tokenize_pairs(examples, tokenizer, model.config.context)[0]
    device = next(model.parameters()).device
    result = []
    for indices in batch_order(len(pairs), batch_size, 0, 0, shuffle=False):
        result += scores(model, make_batch("dpo", pairs, None, indices, tokenizer.pad_id, device)).chunk(2)[0].tolist()
    return result


# ---- before training, and evaluation -----------------------------------------------------------

def without_dropout(model):
    """Dropout off for good (TRL's disable_dropout): the model and its reference must be the same
    function at the first step (loss ln 2, rewards 0), and a random mask on one of the four
    log-probabilities would show up as a reward that is only noise."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "attn_pdrop"):                      # GPT-2's attention dropout, a rate, not a module
            module.attn_pdrop = 0.0


@torch.no_grad()
def add_reference(model, pairs, batch_size, pad_id, device, autocast=nullcontext):
    """The reference's log-probabilities of both answers of every pair, stored with the pair:
    the model as it is now (the pre-trained weights), so that training needs no second copy."""
    from .data import batch_order, make_batch
    model.eval()
    for indices in batch_order(len(pairs), batch_size, 0, 0, shuffle=False):
        batch = make_batch("dpo", pairs, None, indices, pad_id, device)
        with autocast():
            logps = answer_logps(model, batch)[0].tolist()
        for k, i in enumerate(indices):
            pairs[i].ref = (logps[k], logps[len(indices) + k])
    model.train()


def prepare(model, run, pairs, batch_size, pad_id):
    """Before the first step: dropout off, and without LoRA the reference's log-probabilities; a
    reward model gets its score head (trained whole, under LoRA too: it starts from nothing)."""
    without_dropout(model)
    if run.task == "reward":
        add_score_head(model)
        run.print("reward model: a score head on the last answer token's hidden state, trained with"
                  " -log sigmoid(score(chosen) - score(rejected))")
    elif not run.lora:
        run.print(f"reference: the model's log-probabilities of the {len(pairs)} pairs' answers, computed now with"
                  " its initial weights")
        add_reference(model, pairs, batch_size, pad_id, run.device, run.autocast)
    else:
        run.print("reference: the same model with its LoRA adapters off, at each step")


@torch.no_grad()
def evaluate_pairs(model, pairs, batch_size, pad_id, device, autocast=nullcontext, **options):
    """The mean loss and rewards over held-out pairs; rewards/accuracies is the share of pairs whose
    chosen answer the model now prefers more than the reference did (a reward model's: accuracy, the
    share whose chosen answer scores higher)."""
    from .data import batch_order, make_batch
    model.eval()
    totals = {}
    for indices in batch_order(len(pairs), batch_size, 0, 0, shuffle=False):
        batch = make_batch("dpo", pairs, None, indices, pad_id, device)
        with autocast():
            loss = loss_sum(model, batch, **options)
        for name, value in {"loss": loss, **batch["metrics"]}.items():
            totals[name] = totals.get(name, 0.0) + float(value)
    model.train()
    return {name: value / len(pairs) for name, value in totals.items()}
