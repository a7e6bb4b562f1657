"""Nothing is lost, whatever the input: everything is checked before --out is touched, --overwrite
replaces only what nanotune wrote, one run holds a folder at a time, a kill -9 at any moment
leaves a folder that loads and a run that resumes exactly, and files get ordinary permissions."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_cli, run_refusing_writes

import train
from nanotune import GPT2, NanotuneError


def train_args(model, out, *extra):
    return ["--model", model, "--data", "anecdotes_jokes.txt", "--epochs", 3, "--lr", 1e-3, "--out", out, *extra]


def run_train(*args, cwd=ROOT):
    return run_cli("train.py", *args, cwd=cwd)


def weights(out):
    return torch.load(out / "checkpoint/training_state.pt", weights_only=True)["model"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def reproducible_mkl():
    # MKL may choose its product's path by memory alignment; its reproducible mode always takes one,
    # so a resumed process computes bit for bit what the uninterrupted one did.
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MKL_CBWR", "AUTO")
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_gpt2, reproducible_mkl):
    """An uninterrupted 3-epoch run: what every interrupted and resumed run must end with."""
    out = tmp_path_factory.mktemp("full") / "out"
    r = run_train(*train_args(tiny_gpt2, out))
    assert r.returncode == 0, r.stderr
    return out


# ---- the overwrite guard ---------------------------------------------------------------------

def test_a_foreign_file_survives_overwrite(tmp_path, tiny_gpt2, finished_run):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text("{}")
    with pytest.raises(NanotuneError, match="did not write .*notes.txt.* will not replace it"):
        train.main(train.parse_args(list(map(str, train_args(tiny_gpt2, out, "--overwrite")))))
    assert (out / "notes.txt").read_text() == "my notes" and (out / "config.json").read_text() == "{}"


def test_the_working_directory_is_refused(tmp_path, tiny_gpt2, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("# someone's source file\n")
    with pytest.raises(NanotuneError, match="--out . holds files that nanotune did not write"):
        train.main(train.parse_args(list(map(str, train_args(tiny_gpt2, ".", "--overwrite")))))
    assert (tmp_path / "train.py").is_file()


def test_the_model_being_loaded_is_refused(tmp_path, finished_run):
    before = sorted(os.listdir(finished_run))
    with pytest.raises(NanotuneError, match="is the --model .* which this run reads"):
        train.main(train.parse_args(list(map(str, train_args(finished_run, finished_run, "--overwrite")))))
    assert sorted(os.listdir(finished_run)) == before


@pytest.mark.parametrize("typo", ["--model", "--data"])
def test_a_typo_with_overwrite_deletes_nothing(tmp_path, tiny_gpt2, finished_run, typo):
    before = {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()}
    args = train_args(tiny_gpt2, finished_run, "--overwrite")
    args[args.index(typo) + 1] = str(tmp_path / "no-such-thing")
    assert run_train(*args).returncode == 2
    assert {p: p.read_bytes() for p in finished_run.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_an_earlier_run_entirely(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    assert run_train(*train_args(tiny_gpt2, out, "--epochs", 1, "--lora-r", 2)).returncode == 0
    assert (out / "adapter_model.safetensors").is_file()
    r = run_train(*train_args(tiny_gpt2, out, "--epochs", 1, "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert not (out / "adapter_model.safetensors").exists() and (out / "model.safetensors").is_file()   # no mix of two runs
    assert [m["epoch"] for m in metrics(out) if m["event"] == "eval"] == [1]


# ---- one run per folder ----------------------------------------------------------------------

def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path, tiny_gpt2):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, train_args(tiny_gpt2, out, "--epochs", 500))],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = run_train(*train_args(tiny_gpt2, out, "--overwrite"))
        assert second.returncode == 2 and f"in use by another nanotune run (process {first.pid})" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / ".nanotune.lock").is_file()                  # left behind by the killed run...
    third = run_train(*train_args(tiny_gpt2, out, "--epochs", 1, "--overwrite"))
    assert third.returncode == 0, third.stderr                 # ...recognised as stale and taken over
    assert not (out / ".nanotune.lock").exists()               # and released at exit


# ---- crash consistency -----------------------------------------------------------------------

# Runs train.py with one writer replaced by one that is killed (SIGKILL, no clean-up) half-way
# through its n-th file, or with the n-th optimizer step killed before it updates anything; or
# killed half-way through its n-th training state while it is written in the background, once the
# next epoch has taken two steps.
CRASH = r"""
import os, runpy, signal, sys, time
what, nth = sys.argv[1], int(sys.argv[2])
sys.argv = sys.argv[3:]
import torch
import nanotune.hub as hub
calls = 0
def killed_on_nth(real, half_written):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth:
            if half_written:
                real(*args, **kwargs)
                with open(args[1], "r+b") as f:
                    f.truncate(os.path.getsize(args[1]) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapper
if what == "model":
    hub.save_file = killed_on_nth(hub.save_file, True)
elif what == "state":
    torch.save = killed_on_nth(torch.save, True)
elif what == "state-while-training":
    # saved in the background as on a GPU (on this CPU every core trains, so train.py would not)
    import nanotune.run.checkpoint as checkpoint
    checkpoint.saves_in_background = lambda run, epochs: epochs > 1
    steps, real_step, real_save = 0, torch.optim.AdamW.step, torch.save
    def counted_step(self, *args, **kwargs):
        global steps
        steps += 1
        return real_step(self, *args, **kwargs)
    def save_half_then_wait(*args, **kwargs):
        global calls
        calls += 1
        if calls == nth:
            begun = steps
            real_save(*args, **kwargs)
            with open(args[1], "r+b") as f:
                f.truncate(os.path.getsize(args[1]) // 2)
            while steps < begun + 2:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(*args, **kwargs)
    torch.optim.AdamW.step, torch.save = counted_step, save_half_then_wait
else:
    torch.optim.AdamW.step = killed_on_nth(torch.optim.AdamW.step, False)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("what, nth", [("model", 2), ("state", 3), ("state", 1), ("state-while-training", 2),
                                       ("step", 40)],
                         ids=["mid-save-of-the-model", "mid-last-save-of-the-state", "mid-first-save-of-the-state",
                              "mid-background-save-of-the-state", "mid-step"])
def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_gpt2, finished_run, what, nth):
    out = tmp_path / "out"
    args = list(map(str, train_args(tiny_gpt2, out)))
    crashed = subprocess.run([sys.executable, "-c", CRASH, what, str(nth), str(ROOT / "train.py"), *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    if (out / "config.json").is_file():                        # the last good model still loads
        GPT2.from_pretrained(out)
    plain = run_train(*args)                                   # without --resume: told what to do, nothing changed
    assert plain.returncode == 2 and "--resume" in plain.stderr, plain.stderr
    resumed = run_train(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(out.rglob("*.tmp"))                        # the half-written file is gone
    a, b = weights(finished_run), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in metrics(out) if m["event"] == "train"]
    assert steps == sorted(set(steps))                         # every step logged once, in order
    assert [m["epoch"] for m in metrics(out) if m["event"] == "eval"] == [1, 2, 3]
    # Times, speeds and the measured memory peak differ from run to run; everything else must not.
    untimed = lambda records: [{k: v for k, v in m.items() if k not in ("time", "tokens_per_s")} for m in records if m["event"] != "memory"]
    assert untimed(metrics(out)) == untimed(metrics(finished_run))      # the same losses, step for step


def test_sigterm_then_resume_trims_the_metrics_to_the_saved_step(tmp_path, tiny_gpt2, finished_run):
    out = tmp_path / "out"
    args = list(map(str, train_args(tiny_gpt2, out, "--batch-size", 2)))
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    saved = torch.load(out / "checkpoint/training_state.pt", weights_only=True)["progress"]["step"]
    with open(out / "metrics.jsonl", "a") as f:          # as if steps after the saved one had been logged
        f.write(json.dumps({"event": "train", "step": saved + 5, "loss": 1.0}) + "\n" + '{"event": "tr')
    resumed = run_train(*args, "--resume", "--epochs", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert "differ from the interrupted run's: --epochs 1 (was 3)" in resumed.stdout
    steps = [m["step"] for m in metrics(out) if m["event"] == "train"]
    assert steps == sorted(set(steps)) and saved + 5 not in steps[:len([s for s in steps if s <= saved])]


# ---- nothing to train on -----------------------------------------------------------------------

def test_a_tokenizer_that_encodes_nothing_stops_the_run(tmp_path, tiny_gpt2):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_gpt2, model)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["model"]["vocab"], spec["model"]["merges"] = {"<|endoftext|>": 0}, []
    (model / "tokenizer.json").write_text(json.dumps(spec))
    r = run_train("--model", model, "--data", "anecdotes_jokes.txt", "--out", tmp_path / "out")
    assert r.returncode == 2 and "no training token would be scored" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


# ---- files written as any other file ----------------------------------------------------------

@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_saved_files_follow_the_umask(tmp_path, tiny_gpt2, umask, file_mode, dir_mode):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, train_args(tiny_gpt2, out, "--epochs", 1))],
                       cwd=ROOT, capture_output=True, text=True, preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (dir_mode if path.is_dir() else file_mode), path


# ---- a disk that refuses writes --------------------------------------------------------------

def files_in(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_error_line(result, pattern):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), result.stderr


def test_a_read_only_or_full_disk_is_one_line_and_loses_nothing(tmp_path, tiny_gpt2, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = files_in(out)
    r = run_refusing_writes("EROFS", out, "train.py", *train_args(tiny_gpt2, out, "--epochs", 1, "--overwrite"))
    assert_one_error_line(r, rf"cannot write {re.escape(str(out))}.*Read-only file system")
    assert files_in(out) == before
    # the disk fills up when the resumed run saves its training state: the last good one stays
    # (one PyTorch thread leaves a core for the background writer: epoch 4's state is written in the
    # background, and the error comes when epoch 5 has trained)
    r = run_refusing_writes("ENOSPC", out / "checkpoint" / ".training_state.pt", "train.py",
                            *train_args(tiny_gpt2, out, "--epochs", 5, "--resume"), env={"OMP_NUM_THREADS": "1"})
    assert_one_error_line(r, r"cannot write .*training_state\.pt: No space left on device")
    assert "epoch 5:" in r.stdout                              # epoch 5 trained while epoch 4 was written
    assert (out / "checkpoint/training_state.pt").read_bytes() == before[Path("checkpoint/training_state.pt")]
    assert not [p for p in out.rglob("*.tmp")]
    r = run_refusing_writes("EROFS", tmp_path, "generate.py", "--model", finished_run, "--export-onnx", tmp_path / "model.onnx")
    assert_one_error_line(r, r"cannot write .*model\.onnx.*Read-only file system")
    assert not (tmp_path / "model.onnx").exists()


# ---- a search, and the finding and looking modes, keep what a single run would keep ------------------

@pytest.fixture()
def finished_search(tmp_path):
    """A folder as a finished search leaves it: its records, its trials and its best model."""
    out = tmp_path / "search-out"
    (out / "search" / "trial-001").mkdir(parents=True)
    for name, text in (("search.json", '{"trials": []}'), ("args.json", "{}"), ("model.safetensors", "weights"),
                       ("config.json", "{}"), ("search/trial-001/metrics.jsonl", '{"event": "eval", "loss": 1.0}'),
                       ("search/trial-001/model.safetensors", "weights")):
        (out / name).write_text(text)
    return out


def test_a_search_checks_everything_a_single_run_does_before_it_deletes(tmp_path, tiny_gpt2, finished_run, finished_search):
    before = files_in(finished_search)
    r = run_train("--model", tiny_gpt2, "--data", tmp_path / "missing.txt", "--search", "lr=1e-4,1e-3", "--overwrite",
                  "--out", finished_search)
    assert_one_error_line(r, "data file .*missing.txt not found")
    assert files_in(finished_search) == before
    before = files_in(finished_run)
    r = run_train("--model", finished_run, "--data", "anecdotes_jokes.txt", "--search", "lr=1e-4,1e-3", "--overwrite",
                  "--out", finished_run)
    assert_one_error_line(r, "is the --model .* which this run reads")
    assert files_in(finished_run) == before
    r = run_train("--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--search", "lr-find-check=1", "--out", tmp_path / "s")
    assert_one_error_line(r, "for a setting that changes training, one of .*lr.*warmup-steps")


@pytest.mark.parametrize("flag", [["--dry-run"], ["--show-batch"], ["--data-report"], ["--show-groups"], ["--lr-find"]])
def test_a_looking_mode_is_not_searched(tmp_path, tiny_gpt2, flag):
    r = run_train("--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--search", "lr=1e-4,1e-3", *flag, "--out", tmp_path / "s")
    assert_one_error_line(r, f"{flag[0]} looks at one run and trains nothing")
    assert not (tmp_path / "s").exists()


def test_a_range_with_three_numbers_says_what_a_range_is(tmp_path, tiny_gpt2):
    r = run_train("--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--search", "lr=1e-4:1e-3:1e-2", "--trials", 2,
                  "--out", tmp_path / "s")
    assert_one_error_line(r, "a range is two numbers, LOW:HIGH")


def test_lr_find_on_a_finished_run_leaves_its_records(tmp_path, tiny_gpt2, finished_run):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = files_in(out)
    r = run_train(*train_args(tiny_gpt2, out, "--lr-find", "--resume"))    # (on trained weights it may find no valley)
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr
    after = files_in(out)
    assert {k: v for k, v in after.items() if k.name not in ("lr_find.json", "lr_find.png")} == before   # args.json too
    assert "suggestions" in json.loads(after[Path("lr_find.json")])


@pytest.mark.parametrize("schedule", ["linear", "onecycle"])
def test_a_warm_up_as_long_as_the_run_is_pointed_out(tmp_path, tiny_gpt2, schedule):
    r = run_train("--model", tiny_gpt2, "--data", "anecdotes_jokes.txt", "--epochs", 1, "--warmup-steps", 1000,
                  "--lr-schedule", schedule, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "note: --warmup-steps 1000 is not shorter than the run's 28 optimizer steps" in r.stdout
