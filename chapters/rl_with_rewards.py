"""Learning from rewards (GRPO), top to bottom: sample answers, score them, push up the better ones.

    python chapters/rl_with_rewards.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
        --data data/arithmetic.jsonl --reward data/arithmetic_reward.py:correct

No answers to copy this time: a reward function says how good each of the model's own answers is.
For each prompt the model writes G answers; each answer's advantage is how much better it scored
than its group's mean (in units of the group's spread); the loss -advantage x log pi(answer) makes
the better-than-usual answers more likely and the worse ones less. That is the whole idea; train.py
--reward (nanotune/rl.py) adds the clip for reused batches, the KL penalty, the loss normalisations,
held-out scores and resuming. tests/test_rl.py checks that this chapter's advantages are
rl.group_advantages and that its loss has the gradient of rl.policy_loss on-policy.
"""
import argparse

import torch

from nanotune import load_tokenizer
from nanotune.chat import ChatTemplate
from nanotune.generation import generate
from nanotune.lora import DEFAULT_TARGETS, LoRAConfig, add_lora
from nanotune.models import load_model
from nanotune.rewards import load_reward, read_prompts


def advantages(rewards, group_size):
    """Each reward against its group's: (reward - mean) / (std + 1e-4), the group being one prompt's G answers."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = torch.tensor(rewards[start:start + group_size])
        out += ((group - group.mean()) / (group.std() + 1e-4)).tolist()   # all equal: 0, the group teaches nothing
    return out


def answer_logprob(model, prompt, answer):
    """log pi of each answer token given the prompt and the answer so far: position t predicts t + 1."""
    ids = torch.tensor([prompt + answer], device=model.lm_head.weight.device)
    logits = model(ids)[0, len(prompt) - 1:-1]                             # (len(answer), V): one per answer token
    return logits.float().log_softmax(-1).gather(1, ids[0, len(prompt):, None]).squeeze(1)


def step(model, optimizer, prompts, answers, advantages):
    """The policy gradient: -advantage x log pi(token), averaged over every answer token of the batch."""
    tokens = sum(len(a) for a in answers)
    loss = sum(-A * answer_logprob(model, p, a).sum() for p, a, A in zip(prompts, answers, advantages)) / tokens
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def greedy_reward(model, tokenizer, prompts, rows, reward, stops, max_new_tokens):
    """The mean reward of the model's most likely answers: no luck involved."""
    answers = generate(model, prompts, max_new_tokens, tokenizer.pad_id, stops, temperature=0)
    texts = [tokenizer.decode(a) for a in answers]
    return sum(reward(r["prompt"], t, **{k: v for k, v in r.items() if k != "prompt"}) for r, t in zip(rows, texts)) \
        / len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id, folder or .gguf file")
    p.add_argument("--data", default="data/arithmetic.jsonl", help='.jsonl of {"prompt": ..., other fields}')
    p.add_argument("--reward", default="data/arithmetic_reward.py:correct", help="FILE.py:FUNCTION")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8, help="answers sampled per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16, help="0: train every weight")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device=device), load_tokenizer(args.model)
    if args.lora_r:                    # frozen weights, small adapters beside them
        add_lora(model, LoRAConfig(DEFAULT_TARGETS[model.config.model_type], args.lora_r, 2 * args.lora_r, 0.0))
    model.eval()                       # no dropout: the probabilities are those of the policy that sampled

    # The prompts, through the model's chat template if it has one, and the reward function.
    rows = read_prompts(args.data)
    template = ChatTemplate(tokenizer.chat_template, tokenizer) if tokenizer.chat_template else None
    encode = (lambda text: template.encode([{"role": "user", "content": text}], add_generation_prompt=True)) \
        if template else tokenizer.encode
    prompts = [encode(r["prompt"]) for r in rows]
    stops = template.stop_ids() if template else {tokenizer.eos_id}
    reward = load_reward(args.reward, sorted(rows[0].keys() - {"prompt"}))
    held_out = slice(len(rows) - 16, None) if len(rows) > 32 else slice(None)     # the last 16, never trained on
    train_rows = range(len(rows) - 16) if len(rows) > 32 else range(len(rows))
    score = lambda: greedy_reward(model, tokenizer, prompts[held_out], rows[held_out], reward, stops,
                                  args.max_new_tokens)
    print(f"greedy reward before: {score():.3f}")

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(0)
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0)).tolist()
    for n in range(args.steps):
        # 1. Sample G answers to each of a few prompts (the stop token kept: the model learns to stop).
        chosen = [train_rows[order[(n * args.prompts_per_step + i) % len(order)]] for i in range(args.prompts_per_step)]
        batch = [prompts[i] for i in chosen for _ in range(args.group_size)]
        picked = []
        answers = generate(model, batch, args.max_new_tokens, tokenizer.pad_id, stops, 1.0, generator=generator,
                           on_step=lambda logits, seen, tokens: picked.append(tokens))
        answers = [a + [int(picked[len(a)][i])] if len(a) < len(picked) else a for i, a in enumerate(answers)]
        # 2. Score them; 3. compare each with its group.
        texts = [tokenizer.decode(a) for a in answers]
        group_rows = [rows[i] for i in chosen for _ in range(args.group_size)]
        rewards = [float(reward(r["prompt"], t, **{k: v for k, v in r.items() if k != "prompt"}))
                   for r, t in zip(group_rows, texts)]
        # 4. Push up the answers that beat their group, down the others.
        loss = step(model, optimizer, batch, answers, advantages(rewards, args.group_size))
        print(f"step {n + 1}: mean reward {sum(rewards) / len(rewards):.3f}, loss {loss:+.4f}")
    print(f"greedy reward after: {score():.3f}")


if __name__ == "__main__":
    main()
