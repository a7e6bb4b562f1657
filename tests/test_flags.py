"""Every flag of train.py and generate.py is checked as it is parsed: a bad value gives one line that
names the flag and what is allowed, and exit status 2. The tables below must cover every flag, so a
flag added later without a check (and a row here) fails this test."""
import pytest
from conftest import run_cli

from nanotune.run import generate_flags, train_flags

# flag -> values that must be refused
TRAIN_BAD = {
    "--model": [""], "--task": ["text"], "--device": ["bogus", "cuda:99"],
    "--data": [""], "--data-weights": ["0", "-1", "nan", "x"], "--val-data": [" "], "--val-split": ["-0.5", "1", "nan"],
    "--text-column": [""], "--label-column": [" "], "--max-length": ["0", "1", "-5", "x"],
    "--epochs": ["0", "-1", "1.5"], "--batch-size": ["0", "-1"], "--grad-accum": ["0"], "--lr": ["0", "-1", "nan", "inf"],
    "--lr-schedule": ["exponential"], "--warmup-steps": ["-1"], "--weight-decay": ["-0.1", "nan"],
    "--max-grad-norm": ["-1", "nan"], "--freeze": ["half", "-1"], "--class-weights": ["inverse"],
    "--label-smoothing": ["5", "1", "-0.1"], "--patience": ["0"], "--seed": ["-1", "x", str(2**32)],
    "--quantize": ["2bit"], "--quant-type": ["int4"], "--quantize-skip": [""], "--lora-r": ["-1"],
    "--lora-alpha": ["0", "nan"], "--lora-dropout": ["1.5", "1", "-0.1"], "--lora-targets": [""],
    "--out": [""], "--stop-after-epochs": ["0"], "--plain": ["flash", "attention,flash", ""],
    "--stride": ["0", "-1"], "--truncate": ["middle"], "--add-tokens": [""], "--pad-vocab-to-multiple-of": ["0"],
    "--search": [""], "--trials": ["0", "1001"],
    "--lr-decay": ["0", "1.5", "nan"], "--unfreeze": ["sudden"], "--show-batch": ["0", "x"],
    "--chat-template": [""], "--train-on": ["questions"], "--recipe": ["ch3", ""],
    "--tools": [""], "--enable-thinking": ["yes", ""],
    "--reward": [""], "--reward-weights": ["nan", "x"], "--group-size": ["1", "0"], "--scale-rewards": ["std"],
    "--loss-type": ["ppo"], "--epsilon": ["0", "1", "nan"], "--updates-per-batch": ["0"], "--kl-beta": ["-1", "nan"],
    "--max-new-tokens": ["0"], "--temperature": ["0", "-1", "inf"],
    "--beta": ["0", "-1", "nan"], "--dpo-loss": ["hinge"], "--lm-eval": [""], "--lm-eval-limit": ["0", "-1", "nan"],
    "--optim": ["adam8bit", ""],
}
GENERATE_BAD = {
    "--model": [""], "--adapter": [""], "--quantize": ["2bit"], "--dtype": ["fp8"], "--device": ["bogus", "cuda:99"],
    "--prompt-file": [""], "--max-new-tokens": ["0", "-3"], "--temperature": ["-1", "nan", "inf"], "--top-k": ["-1"],
    "--top-p": ["0", "1.5", "nan"], "--repetition-penalty": ["0", "-1", "nan"], "--stop": [""], "--num-samples": ["0"],
    "--seed": ["-1"], "--plain": ["flash"],
    "--eval": [""], "--text-column": [""], "--label-column": [""], "--stride": ["0", "-2"], "--top-losses": ["-1"],
    "--plot": [""], "--ig-steps": ["0"], "--ig-baseline": ["random"], "--explain-top": ["0"],
    "--host": [""], "--port": ["-1", "65536"], "--api-key": [""], "--max-batch": ["0", "257"], "--export-onnx": [""],
    "--export-gguf": [""], "--gguf-type": ["q4_k"], "--chat-template": [""], "--system": [""],
    "--tools": [""], "--enable-thinking": ["maybe"],
    "--lm-eval": [""], "--limit": ["0", "-1", "nan"], "--num-fewshot": ["-1", "x"], "--batch-size": ["0"],
    "--cache-budget": ["0", "x"], "--max-connections": ["0"], "--header-timeout": ["0", "nan"], "--body-timeout": ["-1"],
    "--grace-period": ["-1", "nan"],
}
# Switches take no value; --prompt is checked with the prompt file (empty prompts: test_generate.py).
TRAIN_SWITCHES = {"-h", "--help", "--new-head", "--pack", "--group-by-length", "--data-report", "--dry-run", "--show-groups", "--lr-find", "--lr-find-check", "--bf16", "--fp32", "--grad-checkpointing", "--fsdp", "--double-quant",
                  "--no-double-quant", "--merge", "--resume", "--overwrite", "--reward-model"}
GENERATE_OTHERS = {"-h", "--help", "--prompt", "--compare", "--json", "--explain", "--show-attention", "--serve", "--chat", "--raw"}


@pytest.mark.parametrize("module, table, others", [(train_flags, TRAIN_BAD, TRAIN_SWITCHES), (generate_flags, GENERATE_BAD, GENERATE_OTHERS)])
def test_the_tables_cover_every_flag(module, table, others):
    assert {s for action in module.parser()._actions for s in action.option_strings} == set(table) | others


def cases(table, base):
    return [(base, flag, value) for flag, values in table.items() for value in values]


@pytest.mark.parametrize("base, flag, value", cases(TRAIN_BAD, ["--data", "x.txt"]) + cases(GENERATE_BAD, []),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_value_is_one_line_naming_the_flag(capsys, base, flag, value):
    parse_args = train_flags.parse_args if base else generate_flags.parse_args
    with pytest.raises(SystemExit) as exit:
        parse_args(base + [flag, value] if flag != "--data" else ["--data", value])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: argument {flag}"), err


def test_good_values_pass():
    args = train_flags.parse_args(["--data", "x.txt", "--val-split", "0", "--max-length", "2", "--lr", "1e-3", "--freeze", "2",
                             "--label-smoothing", "0.1", "--lora-dropout", "0", "--seed", "0", "--device", "cpu"])
    assert (args.val_split, args.max_length, args.freeze, args.seed) == (0.0, 2, "2", 0)
    args = generate_flags.parse_args(["--temperature", "0", "--top-p", "1", "--top-k", "0", "--repetition-penalty", "1.3"])
    assert (args.temperature, args.top_p, args.top_k) == (0.0, 1.0, 0)


def test_the_command_prints_one_line_and_no_usage():
    r = run_cli("train.py", "--data", "anecdotes_jokes.txt", "--batch-size", "-1")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: argument --batch-size: -1 is out of range: give a whole number >= 1 (see --help)\n"


@pytest.mark.parametrize("extra, message", [
    (["--reward", "r.py:score", "--search", "lr=1e-4,1e-3"], "--search does not apply to learning from rewards"),
    (["--reward", "r.py:score", "--pack"], "--pack does not apply to learning from rewards"),
    (["--reward", "r.py:score", "--recipe", "ch1"], "--recipe does not apply to learning from rewards"),
    (["--group-size", "4"], "--group-size applies to learning from rewards only: add --reward"),
    (["--temperature", "0.7"], "--temperature applies to learning from rewards only"),
])
def test_a_flag_the_kind_of_training_does_not_read_is_refused(extra, message):
    """--reward runs its own loop (nanotune/rl.py): a flag that one kind of training would silently
    ignore stops the command with one line naming it, before anything is read or written."""
    r = run_cli("train.py", "--data", "prompts.jsonl", *extra)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
