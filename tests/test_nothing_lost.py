"""Nothing lost to conversations cut short or to a kill: a conversation cut by --max-length before
its answer is named and left out (never a NaN model; none left is exit 2 before --out is taken), a
step with nothing to score changes nothing, a weight that is not finite is never saved, and a kill -9
at any instant of a model write leaves a folder that --resume and --overwrite take."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import load_file

import train
from nanotune import GPT2, NanotuneError
from nanotune.data import lm_batch
from nanotune.optim import make_optimizer
from nanotune.run import output

JOKE = [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "A short one: cats nap."}]
RAMBLE = [{"role": "user", "content": "Tell me a long story about " + "cats and dogs and birds " * 20},
          {"role": "assistant", "content": "No."}]


def conversations(path, *rows):
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


def chat_args(model, data, out, *extra):
    return ["--model", model, "--data", data, "--chat-template", "chatml", "--max-length", 48, "--epochs", 1,
            "--batch-size", 1, "--lr", 1e-3, "--out", out, *extra]


def in_process(*args):
    return train.main(train.parse_args(list(map(str, args))))


def test_conversations_cut_before_their_answer_are_named_and_left_out(tmp_path, tiny_llama, tiny_gpt2):
    """Three of nine lose their whole answer at --max-length 48: a note names them (lines 7, 8, 9)
    and the length that keeps them; the others train to a model with only finite weights, without
    validation (Llama) and with it (GPT-2). Before: a 0 / 0 step, an all-NaN model.safetensors and
    exit 0 without validation; "the loss became nan ... lower --lr" with it."""
    data = conversations(tmp_path / "chats.jsonl", *[JOKE] * 6, *[RAMBLE] * 3)
    for n, (model, extra) in enumerate(((tiny_llama, ["--val-split", 0]), (tiny_gpt2, ["--val-data", data]))):
        out = tmp_path / f"out{n}"
        r = run_cli("train.py", *chat_args(model, data, out, *extra))
        assert r.returncode == 0, r.stderr
        assert "3 of 9 training conversations have no answer token within --max-length 48" in r.stdout, r.stdout
        assert "(chats.jsonl line 7, chats.jsonl line 8, chats.jsonl line 9)" in r.stdout
        needed = int(r.stdout.split("; --max-length ")[1].split()[0])
        assert needed > 48
        weights = load_file(out / "model.safetensors")
        assert all(bool(torch.isfinite(t).all()) for t in weights.values())
        if extra[0] == "--val-data":
            assert "3 of 9 validation conversations" in r.stdout
            scores = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert all(s["loss"] == s["loss"] for s in scores if "loss" in s)      # no NaN logged either


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_no_conversation_keeping_its_answer_is_exit_2_before_out_is_taken(tmp_path, tiny_llama, tiny_gpt2, which):
    """Before: a ZeroDivisionError traceback, after --out was taken."""
    data = conversations(tmp_path / "chats.jsonl", *[RAMBLE] * 4)
    out = tmp_path / "out"
    with pytest.raises(NanotuneError) as refused:
        in_process(*chat_args(tiny_llama if which == "llama" else tiny_gpt2, data, out, "--val-split", 0))
    assert "4 of 4 training conversations have no answer token within --max-length 48" in str(refused.value)
    assert "no training conversation is left" in str(refused.value)
    assert not out.exists()


def test_the_data_report_does_not_say_a_cut_conversation_keeps_all_its_tokens(tmp_path, tiny_llama, capsys):
    data = conversations(tmp_path / "chats.jsonl", *[JOKE] * 2, RAMBLE)
    assert in_process(*chat_args(tiny_llama, data, tmp_path / "out", "--data-report")) == 0
    said = capsys.readouterr().out
    assert "all tokens kept" not in said and "not trained on" in said, said


def test_a_step_with_nothing_to_score_changes_nothing(tiny_gpt2):
    """A batch whose every label is -100 (a text's last window of one token): no division by zero,
    no optimizer step, the weights exactly as they were."""
    model = GPT2.from_pretrained(tiny_gpt2).train()
    optimizer = make_optimizer(model, 1e-3, 0.01)
    batch = lm_batch([[5, 6, 7]], 0, [[-100, -100, -100]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summed, count, norm = train.train_step(model, [batch], optimizer, 1e-3, "lm", 1.0, torch.device("cpu"))
    assert count == 0 and float(summed) == 0.0 and norm is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# Runs train.py with one weight turned to NaN after the n-th optimizer step: the last position's
# embedding, which no text of the data reaches, so the loss stays finite (weight decay keeps the NaN).
POISON = r"""
import runpy, sys
import torch
import nanotune.optim
nth, sys.argv = int(sys.argv[1]), sys.argv[2:]
real_step, real_make, calls, models = torch.optim.AdamW.step, nanotune.optim.make_optimizer, [0], []
def make(model, *args, **kwargs):
    models.append(model)
    return real_make(model, *args, **kwargs)
def poisoned(self, *args, **kwargs):
    result = real_step(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == nth:
        with torch.no_grad():
            models[0].transformer.wpe.weight[-1, 0] = float("nan")
    return result
nanotune.optim.make_optimizer, torch.optim.AdamW.step = make, poisoned
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_weight_that_is_not_finite_is_never_saved(tmp_path, tiny_gpt2):
    """Without validation, and with a finite loss: the run stops at the save, naming the weight;
    neither the model nor the training state holds the NaN (before: both did, and exit 0)."""
    out = tmp_path / "out"
    args = ["--model", str(tiny_gpt2), "--data", "anecdotes_jokes.txt", "--epochs", "2", "--out", str(out),
            "--val-split", "0", "--max-length", "32"]                   # positions 32 to 63 never used
    r = subprocess.run([sys.executable, "-c", POISON, "12", str(ROOT / "train.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "transformer.wpe.weight holds nan or inf" in r.stderr, r.stderr
    for path in [out / "model.safetensors", out / "checkpoint/training_state.pt"]:
        if path.exists():
            tensors = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["model"]
            assert all(bool(torch.isfinite(t).all()) for t in tensors.values())


# ---- kill -9 during a model write ----------------------------------------------------------------

# One process (torch imported, no parallel work done yet, so that fork is safe) forks a writer per
# instant: it saves a model and its training state over and over, in place or in the background as
# train.fit's Saver does, and is killed (SIGKILL) after that instant, or ("library") the moment
# safetensors' own `.tmpXXXXXX` appears, before safetensors renames it. After each kill the folder
# must be one that --resume and --overwrite take; taking it clears every temporary the write left.
KILLER = r"""
import json, os, signal, sys, time
from pathlib import Path
import torch
from nanotune import hub
from nanotune.run import output
from nanotune.run.checkpoint import Saver
out, background, instants = Path(sys.argv[1]), sys.argv[2] == "background", sys.argv[3:]
torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])      # its first use imports for seconds: done once here
left = []
for delay in instants:
    pid = os.fork()
    if pid == 0:
        if delay == "library":
            import re, threading
            real = hub.save_file
            def watched(tensors, target, **kwargs):
                def watch():
                    while True:
                        if any(re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", n) for n in os.listdir(os.path.dirname(target))):
                            os.kill(os.getpid(), signal.SIGKILL)
                threading.Thread(target=watch, daemon=True).start()
                return real(tensors, target, **kwargs)
            hub.save_file = watched
        torch.manual_seed(0)
        model = torch.nn.Linear(1000, 1000)                     # 4 MB of weights, in both files
        optimizer = torch.optim.AdamW(model.parameters())
        write = lambda weights: hub.save_model(out, {"model_type": "test"}, weights or model.state_dict())
        saver = Saver(out, model, optimizer, write, background=background)
        step = 0
        while True:
            step += 1
            saver.save(True, {"epoch": step, "step_in_epoch": 0, "step": step})
    if delay != "library":
        time.sleep(float(delay))
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left.append(sorted(str(p.relative_to(out)) for p in out.rglob("*") if output.is_temporary(p.name)))
    for resume, overwrite in ((True, False), (False, True)):
        mode = output.check(out, resume, overwrite)            # refused (NanotuneError) before the fix
        output.RunFolder(out).claim(mode).release()
        assert not [p for p in out.rglob("*") if output.is_temporary(p.name)]
        if overwrite:
            (out / "args.json").write_text("{}")
print(json.dumps(left))
"""


@pytest.mark.parametrize("background", [False, True], ids=["in-place", "background"])
def test_kill_9_at_any_instant_of_a_write_leaves_a_folder_resume_and_overwrite_take(tmp_path, background):
    out = tmp_path / "out"
    out.mkdir()
    (out / "args.json").write_text("{}")                        # a nanotune run folder
    instants = ["library"] * 3 + [0.2 + 0.037 * i for i in range(16)]
    r = subprocess.run([sys.executable, "-c", KILLER, str(out), "background" if background else "in-place",
                        *map(str, instants)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    left = json.loads(r.stdout.splitlines()[-1])
    assert all(left[:3]) and sum(bool(t) for t in left) >= 6, left   # many kills did land mid-write
