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


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("epsilon", [0.2, 10.0])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_is_trls_on_the_same_numbers(loss_type, epsilon, beta):
    """TRL's GRPOTrainer._compute_loss itself, run on these numbers: its model pass replaced by the
    log-probs above, one process, no accumulation (TRL's dapo divides by the batch's answer tokens)."""
    from collections import defaultdict
    from types import SimpleNamespace
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)
    one_process = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
    trl = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (t(LOGPS), torch.zeros(3, 4), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon, use_vllm=False, max_completion_length=4,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False), model=SimpleNamespace(training=False),
        aux_loss_enabled=False, _entropy_bonus_enabled=False, accelerator=one_process,
        _metrics=defaultdict(lambda: defaultdict(list)))
    mask = torch.tensor(MASK)
    inputs = dict(prompt_ids=torch.zeros(3, 2, dtype=torch.long), prompt_mask=torch.ones(3, 2, dtype=torch.long),
                  completion_ids=torch.zeros(3, 4, dtype=torch.long), completion_mask=mask, advantages=t(ADV),
                  old_per_token_logps=t(OLD), ref_per_token_logps=t(REF), num_items_in_batch=mask.sum())
    expected = grpo_trainer.GRPOTrainer._compute_loss(trl, None, inputs)
    got = rl.policy_loss(t(LOGPS), t(OLD), t(ADV), mask, loss_type, epsilon, t(REF), beta, max_length=4)
    assert float(got) == pytest.approx(float(expected), abs=1e-6)


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


def test_rollouts_with_a_seed_are_generate_pys_samples_with_that_seed(tiny_gpt2):
    """The loop samples as `generate.py --seed S --num-samples G` does: the same answers."""
    import re

    from conftest import run_cli
    from nanotune import load_tokenizer
    model, tokenizer = load_model(str(tiny_gpt2)).eval(), load_tokenizer(str(tiny_gpt2))
    prompt = "The cat"
    answers = rl.rollout(model, [tokenizer.encode(prompt)], 4, 12, tokenizer.pad_id, {tokenizer.eos_id}, 0.9,
                         torch.Generator().manual_seed(7))
    texts = [tokenizer.decode(a[:-1] if a[-1] == tokenizer.eos_id else a) for a in answers]
    result = run_cli("generate.py", "--model", tiny_gpt2, "--prompt", prompt, "--num-samples", 4, "--seed", 7,
                     "--temperature", 0.9, "--top-k", 0, "--max-new-tokens", 12, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    printed = re.split(r"--- prompt 1, sample \d\n", result.stdout)[1:]
    assert [p.removesuffix("\n").removeprefix(prompt) for p in printed] == texts
    assert len(set(texts)) > 1                                    # sampled, not four times the same


# ---- the loop, end to end ---------------------------------------------------------------------

PROMPTS = ["The cat", "A dog", "My friend", "The soup"]


@pytest.fixture(scope="module")
def peaked_gpt2(tmp_path_factory, bpe_dir):
    """A tiny GPT-2 initialised with larger weights, so that its next-token distribution has a few
    likely tokens rather than 512 equally unlikely ones: a chosen token turns up now and then."""
    from conftest import make_gpt2
    return make_gpt2(tmp_path_factory.mktemp("peaked"), bpe_dir, initializer_range=0.4)


@pytest.fixture(scope="module")
def token_task(tmp_path_factory, peaked_gpt2):
    """Prompts, and a reward for the share of an answer's 8 tokens that are one chosen token: the
    alphabetic token the untrained model samples most often (so it is rare, but not never)."""
    import collections

    from nanotune import load_tokenizer
    folder = tmp_path_factory.mktemp("task")
    model, tokenizer = load_model(str(peaked_gpt2)).eval(), load_tokenizer(str(peaked_gpt2))
    answers = rl.rollout(model, [tokenizer.encode(p) for p in PROMPTS], 16, 8, tokenizer.pad_id, {tokenizer.eos_id},
                         1.0, torch.Generator().manual_seed(0))
    counts = collections.Counter(t for a in answers for t in a)
    chosen = next(tokenizer.decode([t]) for t, _ in counts.most_common() if tokenizer.decode([t]).strip().isalpha())
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "token": chosen}) + "\n" for p in PROMPTS))
    (folder / "reward.py").write_text("def chosen(prompt, completion, token, **fields):\n"
                                      "    return completion.count(token) / 8\n")
    return folder


def train_on_rewards(model, task, out, *extra, in_process=True):
    """train.py --reward on the token task: in this process (returns the exit status), or as a user
    runs it (returns the CompletedProcess: a run folder stays locked by the process that wrote it)."""
    import train
    from conftest import run_cli
    args = ["--model", str(model), "--data", str(task / "prompts.jsonl"), "--val-split", "0",
            "--reward", f"{task / 'reward.py'}:chosen", "--out", str(out), "--batch-size", "2", "--group-size", "8",
            "--max-new-tokens", "8", "--lr", "3e-3", "--lr-schedule", "constant", "--fp32", *map(str, extra)]
    return train.main(train.parse_args(args)) if in_process else run_cli("train.py", *args)


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, peaked_gpt2, token_task):
    out = tmp_path_factory.mktemp("run") / "out"
    assert train_on_rewards(peaked_gpt2, token_task, out, "--epochs", 4) == 0
    return out


def test_a_tiny_model_learns_to_emit_the_rewarded_token(trained):
    steps = [r for r in metrics(trained) if r["event"] == "train"]
    assert len(steps) == 8                                        # 4 epochs of 2 steps (4 prompts, 2 a step)
    start, end = steps[0]["reward"], sum(r["reward"] for r in steps[-2:]) / 2
    assert start < 0.3 and end > start + 0.4, [r["reward"] for r in steps]
    evals = [r for r in metrics(trained) if r["event"] == "eval"]
    assert evals[-1]["reward"] > evals[0]["reward"]               # greedy answers too


def test_the_log_says_what_a_reader_watches(trained):
    steps = [r for r in metrics(trained) if r["event"] == "train"]
    for record in steps:
        for key in ("reward", "reward_std", "equal_groups", "completion_length", "clip_ratio", "loss",
                    "generation_s", "learning_s", "reward/reward.py:chosen", "reward_std/reward.py:chosen"):
            assert key in record and math.isfinite(record[key]), key
        assert record["clip_ratio"] == 0                          # one update a batch: always on-policy
        assert 1 <= record["completion_length"] <= 8
        assert 0 <= record["equal_groups"] <= 1
        assert record["reward/reward.py:chosen"] == pytest.approx(record["reward"])     # the only function, weight 1
    assert (trained / "model.safetensors").is_file() and (trained / "checkpoint" / "training_state.pt").is_file()


def test_a_stopped_run_resumes_where_it_stopped(tmp_path, trained, peaked_gpt2, token_task):
    """Stopped after epoch 1 and resumed, the run's steps are those of the run that was never stopped
    (a constant rate, so 2 epochs are the first 2 of 4): same batches, same samples (step s samples
    with seed --seed + s), same weights and AdamW state, so the same rewards and gradients."""
    out = tmp_path / "out"
    first = train_on_rewards(peaked_gpt2, token_task, out, "--epochs", 2, "--stop-after-epochs", 1, in_process=False)
    assert first.returncode == 0, first.stderr
    assert len([r for r in metrics(out) if r["event"] == "train"]) == 2
    second = train_on_rewards(peaked_gpt2, token_task, out, "--epochs", 2, "--resume", in_process=False)
    assert second.returncode == 0, second.stderr
    assert "resuming at epoch 2, step 2" in second.stdout
    steps = lambda o: [(r["step"], r["reward"], r["loss"], r["grad_norm"]) for r in metrics(o) if r["event"] == "train"]
    assert steps(out) == steps(trained)[:4]


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------

BAD_REWARDS = {
    "no_file": (None, "missing.py:score", r"no such file .*missing\.py"),
    "no_function": ("def other(prompt, completion, **fields):\n    return 1.0\n", "{}:score",
                    r"defines no function 'score' \(it defines: other\)"),
    "wrong_signature": ("def score(completion):\n    return 1.0\n", "{}:score",
                        r"score must take \(prompt, completion, \*\*fields\)"),
    "not_a_number": ("def score(prompt, completion, **fields):\n    return 'good'\n", "{}:score",
                     r"returned 'good' for the prompt 'The cat'"),
    "nan": ("def score(prompt, completion, **fields):\n    return float('nan')\n", "{}:score",
            r"returned nan for the prompt 'The cat': a reward must be a finite number"),
    "infinity": ("def score(prompt, completion, **fields):\n    return float('inf')\n", "{}:score",
                 r"returned inf for the prompt"),
}


@pytest.mark.parametrize("case", BAD_REWARDS)
def test_a_bad_reward_function_stops_before_anything_is_written(tmp_path, tiny_gpt2, case):
    import train
    source, spec, message = BAD_REWARDS[case]
    if source is not None:
        (tmp_path / "reward.py").write_text(source)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "The cat", "answer": 3}) + "\n")
    args = train.parse_args(["--model", str(tiny_gpt2), "--data", str(tmp_path / "prompts.jsonl"), "--val-split", "0",
                             "--reward", spec.format(tmp_path / "reward.py"), "--out", str(tmp_path / "out"),
                             "--max-new-tokens", "4"])
    with pytest.raises(NanotuneError, match=message):
        train.main(args)
    assert not (tmp_path / "out").exists()


def test_bad_settings_exit_2_with_one_line(tmp_path, tiny_gpt2):
    from conftest import run_cli
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "The cat " * 20}) + "\n")
    (tmp_path / "reward.py").write_text("def score(prompt, completion, **fields):\n    return 1.0\n")
    common = ["--model", tiny_gpt2, "--data", tmp_path / "prompts.jsonl", "--val-split", 0,
              "--reward", f"{tmp_path / 'reward.py'}:score", "--out", tmp_path / "out"]
    for extra, message in ((["--group-size", 1], "--group-size: 1 is out of range"),
                           (["--max-new-tokens", 30], "leaves no room for --max-new-tokens 30 in the model's 64"),
                           (["--reward-weights", 1, 2], "--reward-weights gives 2 weights for 1 --reward")):
        result = run_cli("train.py", *common, *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lora", [True, False])
def test_kl_to_the_reference_and_reused_batches(tmp_path, peaked_gpt2, token_task, lora):
    """--kl-beta: the reference is the model with its adapters off (LoRA) or a frozen copy. With
    --updates-per-batch 2 the second update of a batch is off-policy: the ratio is no longer 1, the
    clip can bite, and the policy has moved from the reference (KL > 0, measured at that update)."""
    out = tmp_path / "out"
    extra = ["--lora-r", 4, "--lora-dropout", 0] if lora else []
    assert train_on_rewards(peaked_gpt2, token_task, out, "--epochs", 1, "--kl-beta", 0.1, "--updates-per-batch", 2,
                            "--group-size", 4, *extra) == 0
    steps = [r for r in metrics(out) if r["event"] == "train"]
    assert len(steps) == 2 and all(0 <= r["clip_ratio"] <= 1 for r in steps)
    assert all(r["kl"] > 1e-7 for r in steps) and all(r["loss"] != 0 for r in steps)
    assert (out / ("adapter_model.safetensors" if lora else "model.safetensors")).is_file()


# ---- the chapter ------------------------------------------------------------------------------

def chapter():
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("rl_with_rewards", ROOT / "chapters" / "rl_with_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_chapter_is_the_loop_on_policy(peaked_gpt2):
    """The chapter's textbook pieces are the loop's: its advantages are group_advantages, and its
    step (-advantage x log pi, over every answer token) moves the weights exactly as policy_loss
    (dapo, on-policy: the ratio's gradient is log pi's) followed by the same clip and optimizer."""
    import copy
    ch = chapter()
    rewards = [1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 2.0, 2.0]
    assert ch.advantages(rewards, 4) == pytest.approx(rl.group_advantages(torch.tensor(rewards), 4).tolist(), abs=1e-6)
    model = load_model(str(peaked_gpt2)).eval()
    prompts = [[5, 6, 7]] * 4 + [[8, 9]] * 4
    answers = answers_of(model, [[5, 6, 7], [8, 9]], 4, seed=1)
    advantages = rl.group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0]), 4)
    plain = copy.deepcopy(model)
    ch.step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), prompts, answers, advantages.tolist())
    logps, mask = rl.answer_logps(model, prompts, answers, 1.0)
    rl.policy_loss(logps, logps.detach(), advantages, mask, "dapo").backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    for (name, a), b in zip(plain.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_the_chapter_runs_top_to_bottom(peaked_gpt2, token_task, capsys):
    chapter().main(["--model", str(peaked_gpt2), "--data", str(token_task / "prompts.jsonl"),
                    "--reward", f"{token_task / 'reward.py'}:chosen", "--steps", "2", "--group-size", "4",
                    "--prompts-per-step", "2", "--lora-r", "4", "--lr", "1e-3"])
    printed = capsys.readouterr().out
    assert "greedy reward before" in printed and "step 2: mean reward" in printed and "greedy reward after" in printed


def test_a_run_killed_mid_epoch_resumes_where_it_stopped(tmp_path, trained, peaked_gpt2, token_task):
    """SIGTERM during a step: the step finishes, the state is saved, the run stops (128 + 15); resumed,
    it continues inside the epoch and takes the steps of the run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    out = tmp_path / "out"
    args = ["--model", peaked_gpt2, "--data", token_task / "prompts.jsonl", "--val-split", 0, "--reward",
            f"{token_task / 'reward.py'}:chosen", "--out", out, "--batch-size", 2, "--group-size", 8,
            "--max-new-tokens", 8, "--lr", "3e-3", "--lr-schedule", "constant", "--fp32", "--epochs", 2]
    run = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in run.stdout:                                   # stop it as soon as step 1 is done
        if line.startswith("step 1:"):
            run.send_signal(signal.SIGTERM)
            break
    rest, err = run.communicate(timeout=600)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal" in rest
    stopped_at = len([r for r in metrics(out) if r["event"] == "train"])
    assert stopped_at in (1, 2, 3)                            # inside the run: the step under way was finished
    from conftest import run_cli
    resumed = run_cli("train.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = lambda o: [(r["step"], r["reward"], r["loss"], r["grad_norm"]) for r in metrics(o) if r["event"] == "train"]
    assert steps(out) == steps(trained)[:4]


@pytest.mark.parametrize("name, text, message", [
    ("prompts.jsonl", '{"question": "The cat"}\n', r'line 1 has no "prompt"'),
    ("prompts.jsonl", '{"prompt": ""}\n', r'line 1 has no "prompt"'),
    ("prompts.txt", "The cat\n", r"learning from rewards reads \.jsonl prompts"),
])
def test_prompts_that_cannot_be_read_stop_before_anything_is_written(tmp_path, tiny_gpt2, name, text, message):
    import train
    (tmp_path / name).write_text(text)
    (tmp_path / "reward.py").write_text("def score(prompt, completion, **fields):\n    return 1.0\n")
    args = train.parse_args(["--model", str(tiny_gpt2), "--data", str(tmp_path / name), "--val-split", "0",
                             "--reward", f"{tmp_path / 'reward.py'}:score", "--out", str(tmp_path / "out")])
    with pytest.raises(NanotuneError, match=message):
        train.main(args)
    assert not (tmp_path / "out").exists()
