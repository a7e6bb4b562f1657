"""Learning from rewards: GRPO (Shao et al., 2024), with the DAPO and Dr. GRPO normalisations.

Supervised fine-tuning shows the model the right answer. Here there is no answer to copy, only a
function that scores what the model writes (nanotune/rewards.py). Each step:
  1. generate    G answers to each of a few prompts, sampled (batched, with the key/value cache)
  2. score       every answer with the reward functions
  3. advantages  each reward minus its group's mean: better or worse than the model's usual answer
                 to *this* prompt. The group is the baseline, so no value network is trained.
  4. log-probs   of the sampled tokens, under the model being trained
  5. loss        -advantage x probability ratio on every answer token: up the tokens of answers
                 that beat their group, down the rest
  6. step        AdamW, clipped, as in supervised training
The loss is about 0 on-policy while the model learns (README, "Learning from rewards").
"""
import copy
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import batch_order
from .generation import generate
from .lora import adapters_off, add_lora, save_adapter
from .losses import IGNORE
from .models import check_tokenizer_fits, load_model
from .optim import lr_at, make_optimizer
from .rewards import read_task, score
from .run.checkpoint import Saver, StopSignals
from .run.metrics import MetricsLog
from .run.output import take


def group_advantages(rewards, group_size, scale="group"):
    """(N,) rewards of N = prompts x G answers, each prompt's G in a row -> (N,) advantages: the reward
    minus its group's mean, over the group's std (scale="group", GRPO; + 1e-4: equal rewards give 0,
    not 0/0), the batch's ("batch"), or not scaled ("none", Dr. GRPO: a small std would give the
    questions the model almost always gets right, or wrong, the largest steps)."""
    groups = rewards.view(-1, group_size)                                  # (prompts, G)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return advantages / (groups.std(dim=1).repeat_interleave(group_size) + 1e-4)
    if scale == "batch":
        return advantages / (rewards.std() + 1e-4)
    return advantages


def policy_loss(logps, old_logps, advantages, mask, loss_type="dapo", epsilon=0.2, ref_logps=None, kl_beta=0.0,
                max_length=None):
    """The clipped policy-gradient loss of PPO, as GRPO uses it, over answer tokens (mask (B, L) 1).

    ratio = pi(token) / pi_old(token) is 1 on-policy, and its gradient that of log pi: -advantage x
    ratio pushes up every token of an answer that beat its group. A reused batch (--updates-per-batch
    > 1) moves the ratio from 1, and min(ratio A, clip(ratio) A) stops the push once a probability
    has moved by more than epsilon: a few lucky samples cannot drag the model far from the policy
    that drew them. kl_beta > 0 adds the k3 estimate of KL(pi || ref), exp(ref - logp) - (ref - logp)
    - 1 per token (>= 0, unbiased), to stay near the reference model.
    How the token losses become one number is what the three variants differ in:
      grpo     the mean over each answer's tokens, then over answers: a token of a short answer
               weighs more than one of a long answer (which biases towards long wrong answers)
      dapo     the mean over every answer token of the batch: each token weighs the same
      dr_grpo  the sum divided by answers x max_length (--max-new-tokens, a constant): no
               length weighting at all"""
    ratio = torch.exp(logps - old_logps)                                      # (B, L)
    A = advantages[:, None]                                                   # (B, 1)
    per_token = -torch.min(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)
    if kl_beta:
        per_token = per_token + kl_beta * (torch.exp(ref_logps - logps) - (ref_logps - logps) - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    return (per_token * mask).sum() / (mask.shape[0] * (max_length or mask.shape[1]))


def rollout(model, prompts, group_size, max_new_tokens, pad_id, stops, temperature, generator):
    """G sampled answers to each prompt, each with its stop token if it stopped: stopping is learned too."""
    sequences = [ids for ids in prompts for _ in range(group_size)]
    picked = []                                                   # the tokens drawn at each step, (B,) each
    new = generate(model, sequences, max_new_tokens, pad_id, stops, temperature, generator=generator,
                   on_step=lambda logits, seen, tokens: picked.append(tokens))
    return [ids + [int(picked[len(ids)][i])] if len(ids) < len(picked) else ids for i, ids in enumerate(new)]


def answer_logps(model, prompts, answers, temperature):
    """log pi(token) of every answer token (B, L), and the mask of real ones. Prompts are padded on the
    left and answers on the right, so every answer starts at column P (position t predicts token t + 1);
    the logits are divided by the sampling temperature: the probabilities of the policy that sampled."""
    P, L = max(map(len, prompts)), max(map(len, answers))
    ids = torch.tensor([[0] * (P - len(p)) + p + a + [0] * (L - len(a)) for p, a in zip(prompts, answers)])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + len(a)) + [0] * (L - len(a))
                         for p, a in zip(prompts, answers)])                          # (B, P + L)
    ids, mask = ids.to(model.lm_head.weight.device), mask.to(model.lm_head.weight.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model(ids, mask, positions, output_layer=False)[:, P - 1:-1]            # (B, L, C): predicts the answer
    logits = model.lm_head(hidden).float() / temperature                              # (B, L, V)
    targets = ids[:, P:].masked_fill(mask[:, P:] == 0, IGNORE)           # log pi = -cross-entropy; -100: 0
    logps = -F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return logps, mask[:, P:]


def learn(model, reference, optimizer, lr, prompts, answers, advantages, args):
    """Steps 4-6, --updates-per-batch times (the first on-policy): the last loss, clip ratio, KL, norm."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    old = ref = None
    with torch.no_grad():
        if args.updates_per_batch > 1:              # the sampling policy, fixed while the batch is reused
            old = answer_logps(model, prompts, answers, args.temperature)[0]
        if args.kl_beta:                            # LoRA: the same model with its adapters off; else a frozen copy
            with adapters_off(model) if reference is None else nullcontext():
                ref = answer_logps(model if reference is None else reference, prompts, answers, args.temperature)[0]
    for _ in range(args.updates_per_batch):
        logps, mask = answer_logps(model, prompts, answers, args.temperature)
        old_logps = logps.detach() if old is None else old     # on-policy: ratio 1, its gradient that of log pi
        loss = policy_loss(logps, old_logps, advantages, mask, args.loss_type, args.epsilon, ref, args.kl_beta,
                           args.max_new_tokens)
        loss.backward()
        # Rewards are noisy; clipping the gradient's norm keeps one lucky batch from taking a huge step.
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                              args.max_grad_norm or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ratio, A, real = torch.exp(logps.detach() - old_logps), advantages[:, None], mask.bool()
    clipped = ((ratio < 1 - args.epsilon) & (A < 0)) | ((ratio > 1 + args.epsilon) & (A > 0))
    kl = None if ref is None else (torch.exp(ref - logps) - (ref - logps) - 1).detach()[real].mean().item()
    return loss.item(), clipped[real].float().mean().item(), kl, norm.item()


def train(args, run):
    """`python train.py --reward FILE.py:function`: the six steps above, epoch by epoch over the prompts."""
    task = read_task(args, run)          # prompts, reward functions, tokenizer, room: checked before the model loads
    model = load_model(args.model, device=run.device, quantize=run.quant)
    check_tokenizer_fits(model, task.tokenizer, args.model)
    model = add_lora(model, run.lora) if run.lora else model          # LoRA: the model frozen, adapters beside it
    # Without LoRA, --kl-beta needs the model as it was: a frozen copy (under LoRA: the adapters off).
    reference = copy.deepcopy(model).requires_grad_(False) if args.kl_beta and not run.lora else None
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    model.eval()                         # dropout off: the log-probs must be those of the policy that sampled
    before = task.held_out_reward(model)      # the reward functions meet real answers, before anything is written
    progress = take(args, run, model, optimizer)
    out, log = Path(args.out), MetricsLog(Path(args.out))
    if progress["step"] == 0:
        log.log("eval", epoch=0, step=0, reward=before)
    run.print(f"reward before training (greedy, {task.held_out}): {before:.3f}")
    rows, tokenizer, stops, G = task.rows, task.tokenizer, task.stops, args.group_size
    stop, step, total = StopSignals(), progress["step"], math.ceil(len(rows) / args.batch_size) * args.epochs
    def write_model(weights):             # the model in the Hub layout (or the LoRA adapter in PEFT's), its tokenizer
        save_adapter(model, out, run.lora, args.model) if run.lora else model.save_pretrained(out)
        tokenizer.save(out)
    saver = Saver(out, model, optimizer, write_model)
    for epoch in range(progress["epoch"], args.epochs):
        batches = batch_order(len(rows), args.batch_size, args.seed, epoch)        # the same after a resume
        for step_in_epoch in range(progress["step_in_epoch"] if epoch == progress["epoch"] else 0, len(batches)):
            lr = lr_at(step, args.lr, args.warmup_steps, total, args.lr_schedule)
            batch_rows, batch_prompts = zip(*[(rows[i], task.prompts[i]) for i in batches[step_in_epoch]])
            # 1. Generate. Step s samples with seed --seed + s: a resumed run draws what this one would have.
            started, generator = time.time(), torch.Generator(run.device).manual_seed(args.seed + step)
            answers = rollout(model, batch_prompts, G, args.max_new_tokens, tokenizer.pad_id, stops,
                              args.temperature, generator)
            generated = time.time()
            # 2. Score: the reward functions read the answers as text, without the stop token.
            texts = [tokenizer.decode(a[:-1] if a[-1:] and a[-1] in stops else a) for a in answers]
            rewards, each = score(task.functions, task.weights, [r for r in batch_rows for _ in range(G)], texts)
            rewards = torch.tensor(rewards)
            # 3. Advantages. A group whose G answers scored the same has advantage 0 everywhere: it teaches nothing.
            advantages = group_advantages(rewards, G, args.scale_rewards).to(run.device)
            # 4.-6. Log-probs, loss, step.
            with run.autocast():
                loss, clip_ratio, kl, norm = learn(model, reference, optimizer, lr, [p for p in batch_prompts
                                                   for _ in range(G)], answers, advantages, args)
            step += 1
            groups = rewards.view(-1, G)                        # equal groups: all G answers scored the same
            record = dict(loss=loss, lr=lr, reward=rewards.mean().item(), reward_std=rewards.std().item(),
                          equal_groups=(groups.amax(1) == groups.amin(1)).float().mean().item(),
                          completion_length=sum(map(len, answers)) / len(answers), clip_ratio=clip_ratio,
                          grad_norm=norm, generation_s=generated - started, learning_s=time.time() - generated)
            record |= {f"{name}/{Path(spec).name}": f(torch.tensor(values)).item() for spec, values in
                       zip(args.reward, each) for name, f in (("reward", torch.mean), ("reward_std", torch.std))}
            log.log("train", epoch=epoch + 1, step=step, **record, **({"kl": kl} if kl is not None else {}))
            run.print("step {}: reward {reward:.3f}, equal groups {equal_groups:.0%}, loss {loss:+.4f}, answers of"
                      " {completion_length:.1f} tokens; {generation_s:.1f} s generating, {learning_s:.1f} s learning"
                      .format(step, **record))
            if stop.requested(run.device):
                where = progress | {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "step": step}
                return saver.stop(where, stop.received, run.print)
        # After every epoch: the held-out reward, the model, then the state to resume from.
        progress.update(epoch=epoch + 1, step_in_epoch=0, step=step)
        after = task.held_out_reward(model)
        log.log("eval", epoch=epoch + 1, step=step, reward=after)
        run.print(f"epoch {epoch + 1}: reward (greedy, {task.held_out}) {after:.3f}, was {before:.3f}")
        saver.save(True, progress, last=True)      # in place; a weight that is not finite stops the run
        if args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs and epoch + 1 < args.epochs:
            run.print(f"stopped after epoch {epoch + 1} as asked: continue with the same command plus --resume")
            return 0
    run.print(f"saved the model to {out}/")
    return 0
