"""Learning from rewards (nanotune/rl.py, nanotune/rewards.py): the advantages and the loss against the
published formulas, the loop end to end on a tiny model, its checks, its log and its resumption."""
import json
import math
import statistics

import pytest
import torch

from nanotune import NanotuneError, rl
from nanotune.models import load_model

# ---- the formulas, written out one number at a time -------------------------------------------


def test_group_advantages_are_reward_minus_group_mean_over_std():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 3.0, 1.0, 0.0]
    groups = [rewards[i:i + 4] for i in range(0, 12, 4)]
    got = {scale: rl.group_advantages(torch.tensor(rewards, dtype=torch.float64), 4, scale).tolist()
           for scale in ("group", "batch", "none")}
    batch_std = statistics.stdev(rewards)                   # unbiased, as torch.std and TRL
    for g, group in enumerate(groups):
        mean, std = statistics.mean(group), statistics.stdev(group)
        for i, r in enumerate(group):
            assert got["none"][4 * g + i] == pytest.approx(r - mean, abs=1e-6)
            assert got["group"][4 * g + i] == pytest.approx((r - mean) / (std + 1e-4), abs=1e-6)
            assert got["batch"][4 * g + i] == pytest.approx((r - mean) / (batch_std + 1e-4), abs=1e-6)
    assert got["group"][4:8] == [0.0] * 4                   # equal rewards: advantage 0, not 0/0


LOGPS = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, -0.7, -3.0], [-2.5, -0.2, -0.9, -1.1]]
OLD = [[-1.1, -0.3, -2.0, -0.4], [-0.6, -1.0, -0.4, -3.0], [-2.4, -0.9, -0.5, -1.0]]
REF = [[-0.9, -0.6, -1.5, -0.2], [-0.5, -1.1, -0.8, -2.0], [-2.0, -0.4, -1.0, -1.3]]
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
ADV = [0.8, -1.3, 0.5]


def published_loss(loss_type, epsilon, beta, max_length=4):
    """GRPO's objective as TRL's GRPOTrainer._compute_loss computes it, one token at a time."""
    per_answer = []
    for lp_row, old_row, ref_row, mask_row, a in zip(LOGPS, OLD, REF, MASK, ADV):
        terms = []
        for lp, old, ref, m in zip(lp_row, old_row, ref_row, mask_row):
            if not m:
                continue
            ratio = math.exp(lp - old)
            clipped = min(max(ratio, 1 - epsilon), 1 + epsilon)
            loss = -min(ratio * a, clipped * a)
            loss += beta * (math.exp(ref - lp) - (ref - lp) - 1)     # k3: exp(ref - logp) - (ref - logp) - 1
            terms.append(loss)
        per_answer.append(terms)
    tokens = sum(len(t) for t in per_answer)
    if loss_type == "grpo":
        return sum(sum(t) / len(t) for t in per_answer) / len(per_answer)
    if loss_type == "dapo":
        return sum(sum(t) for t in per_answer) / tokens
    return sum(sum(t) for t in per_answer) / (len(per_answer) * max_length)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("epsilon", [0.2, 10.0])            # 10: the clip never bites
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_is_the_published_formula(loss_type, epsilon, beta):
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)
    got = rl.policy_loss(t(LOGPS), t(OLD), t(ADV), torch.tensor(MASK), loss_type, epsilon, t(REF), beta)
    assert float(got) == pytest.approx(published_loss(loss_type, epsilon, beta), abs=1e-6)
    if loss_type == "dr_grpo":                 # the constant is --max-new-tokens, not the batch's width
        got = rl.policy_loss(t(LOGPS), t(OLD), t(ADV), torch.tensor(MASK), loss_type, epsilon, t(REF), beta,
                             max_length=16)
        assert float(got) == pytest.approx(published_loss(loss_type, epsilon, beta, 16), abs=1e-6)


def test_the_clip_changes_the_loss_on_these_numbers():
    """So that the test above, with and without the clip, tests two different things."""
    assert published_loss("dapo", 0.2, 0.0) != pytest.approx(published_loss("dapo", 10.0, 0.0), abs=1e-3)


def test_a_group_of_equal_rewards_contributes_no_gradient():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    advantages = rl.group_advantages(rewards, 4, "group")
    logps = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        logps.grad = None
        rl.policy_loss(logps, logps.detach(), advantages, torch.ones(8, 5), loss_type).backward()
        assert logps.grad[4:].abs().max() == 0                # the equal group: nothing
        assert logps.grad[:4].abs().min() > 0                 # the other: every token


# ---- on a model -------------------------------------------------------------------------------

def answers_of(model, prompts, G, seed, max_new_tokens=6):
    generator = torch.Generator().manual_seed(seed)
    return rl.rollout(model, prompts, G, max_new_tokens, 0, {model.config.eos_token_id}, 1.0, generator)


def test_on_policy_the_loss_is_zero_and_the_gradient_is_not(tiny_gpt2):
    model = load_model(str(tiny_gpt2)).eval()
    prompts = [[5, 6, 7], [8, 9]]
    answers = answers_of(model, prompts, 4, seed=0)
    repeated = [p for p in prompts for _ in range(4)]
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0]), 4)
    logps, mask = rl.answer_logps(model, repeated, answers, 1.0)
    loss = rl.policy_loss(logps, logps.detach(), advantages, mask, "grpo")
    assert abs(loss.item()) < 1e-6                         # ratio 1, advantages summing to 0 in each group
    loss.backward()
    grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
    assert grads and max(grads) > 0


def test_answer_logps_are_the_models_own(tiny_gpt2):
    """The log-probability of each answer token, read from one forward pass of prompt + answer
    (left- and right-padded together), equals the model's on that sequence alone."""
    model = load_model(str(tiny_gpt2)).eval()
    prompts, answers = [[5, 6, 7, 8], [9]], [[10, 11], [12, 13, 14]]
    logps, mask = rl.answer_logps(model, prompts, answers, 1.0)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for i, (p, a) in enumerate(zip(prompts, answers)):
        with torch.no_grad():
            alone = model(torch.tensor([p + a])).log_softmax(-1)[0]
        expected = [alone[len(p) - 1 + j, t] for j, t in enumerate(a)]
        assert torch.allclose(logps[i, :len(a)], torch.stack(expected), atol=1e-5)
