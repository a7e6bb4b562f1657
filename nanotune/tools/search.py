"""Hyper-parameter search: short train.py runs with different settings, ranked by validation loss.

    python train.py --data ... --search "lr=1e-5,5e-5,1e-4" --search "batch-size=8,16"    # a grid: 6 trials
    python train.py --data ... --search "lr=1e-6:1e-3" --trials 8                         # 8 random draws

Each trial is a plain `train.py` command (it is printed) with its own folder, OUT/search/trial-NNN,
the same data, the same validation split and the same seed, so the trials differ only in what is
searched. Results go to OUT/search.json after every trial; a stopped search continues with the
same command plus --resume, skipping the finished trials. The best trial's model is copied into OUT.
"""
import argparse
import itertools
import json
import math
import random
import signal
import subprocess
import sys
from pathlib import Path

from ..errors import NanotuneError
from ..files import atomic_write, cannot_write, copy_file, write_json
from ..run import output

# The settings that change what training does; a trial differs from the others only in these.
SEARCHABLE = {"lr", "batch_size", "grad_accum", "epochs", "lr_schedule", "lr_decay", "unfreeze", "warmup_steps",
              "weight_decay", "max_grad_norm", "freeze", "class_weights", "label_smoothing", "patience", "quantize",
              "quant_type", "quantize_skip", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "max_length",
              "stride", "truncate", "data_weights"}
# Modes that look at one run (or find a rate) and train nothing: there is nothing to rank.
LOOKING = {"data_report": "--data-report", "dry_run": "--dry-run", "show_batch": "--show-batch",
           "show_groups": "--show-groups", "lr_find": "--lr-find"}


def parse(specs, parser, random_trials):
    """{flag name: [values]} or {flag name: (low, high)} from --search "name=a,b,c" / "name=low:high",
    each value converted (and range-checked) by the flag's own type."""
    actions = {a.option_strings[-1].lstrip("-"): a for a in parser._actions if a.option_strings}
    space = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().lstrip("-")
        action = actions.get(name)
        if action is None or action.dest not in SEARCHABLE or not values.strip():
            searchable = sorted(n for n, a in actions.items() if a.dest in SEARCHABLE and n == a.dest.replace("_", "-"))
            raise NanotuneError(f"--search {spec!r}: give NAME=V1,V2,... or NAME=LOW:HIGH for a setting that changes"
                                f" training, one of {', '.join(searchable)}")
        convert = (lambda v: action.type(v)) if action.type else str
        try:
            if ":" in values and "," not in values:
                if not random_trials:
                    raise NanotuneError(f"--search {spec!r} is a range: draw from it with --trials N (or list"
                                        " the values)")
                if values.count(":") != 1:
                    raise NanotuneError(f"--search {spec!r}: a range is two numbers, LOW:HIGH, e.g. {name}=1e-6:1e-3"
                                        " (or list values: V1,V2,V3)")
                low, high = (convert(v.strip()) for v in values.split(":"))
                if not (isinstance(low, (int, float)) and 0 < low < high):
                    raise NanotuneError(f"--search {spec!r}: a range needs 0 < LOW < HIGH (values are drawn"
                                        " log-uniformly)")
                space[name] = (low, high)
            else:
                space[name] = [convert(v.strip()) for v in values.split(",")]
                if action.choices is not None and any(v not in action.choices for v in space[name]):
                    raise NanotuneError(f"--search {spec!r}: --{name} takes {', '.join(map(str, action.choices))}")
        except Exception as e:
            if isinstance(e, NanotuneError):
                raise
            raise NanotuneError(f"--search {spec!r}: --{name} {e}") from None
    return space


def draw(space, trials, seed):
    """The trials' settings: every combination of the lists (a grid), or `trials` random draws,
    ranges log-uniform (a learning rate matters by its order of magnitude, not its digits)."""
    if not trials:
        names = list(space)
        return [dict(zip(names, combo)) for combo in itertools.product(*space.values())]
    rng = random.Random(seed)
    settings = []
    for _ in range(trials):
        s = {}
        for name, values in space.items():
            if isinstance(values, tuple):
                low, high = values
                v = math.exp(rng.uniform(math.log(low), math.log(high)))
                s[name] = round(v) if isinstance(low, int) else float(f"{v:.3g}")
            else:
                s[name] = rng.choice(values)
        settings.append(s)
    return settings


def command(args, parser, settings, out):
    """The train.py command of one trial: the search's own flags, the trial's settings, its folder."""
    argv = []
    overrides = {parser_dest(parser, k): v for k, v in settings.items()}
    for action in parser._actions:
        if not action.option_strings or action.dest in {"search", "trials", "out", "resume", "overwrite", "help"}:
            continue
        value = overrides.get(action.dest, getattr(args, action.dest))
        flag = action.option_strings[-1] if action.nargs != 0 else action.option_strings[0]
        if value is None or value == action.default and action.dest not in overrides:
            continue
        if action.nargs == 0:                                    # a switch
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(f"--{action.dest.replace('_', '-')}" if value else f"--no-{action.dest.replace('_', '-')}")
            elif value:
                argv.append(action.option_strings[0])
        elif isinstance(value, (list, tuple)) and action.dest == "plain":
            argv += [flag, ",".join(value)]
        elif isinstance(value, list) and action.nargs == "+":
            argv += [flag, *map(str, value)]
        elif isinstance(value, list):                            # repeated: --data a --data b
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return [sys.executable, str(Path(sys.argv[0]).resolve()), *argv, "--out", str(out)]


def parser_dest(parser, name):
    return next(a.dest for a in parser._actions if a.option_strings and a.option_strings[-1].lstrip("-") == name)


def best_scores(trial_out):
    """The trial's best validation scores, from its metrics.jsonl (None if it has none)."""
    path = Path(trial_out) / "metrics.jsonl"
    if not path.is_file():
        return None
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval"' in line]
    if not evals:
        return None
    best = min(evals, key=lambda r: r["loss"])
    return {k: v for k, v in best.items() if k not in ("event", "time")}


def run(args, parser, check, say=print):
    """The search. `check(args)` runs the checks of a single run on `args` (flags, data, model,
    tokenizer, --out against every input) and returns what starting in --out means; every trial
    passes them, with --out the search's own folder, before the search writes anything."""
    looking = [flag for dest, flag in LOOKING.items() if getattr(args, dest)]
    if looking:
        raise NanotuneError(f"{looking[0]} looks at one run and trains nothing, so there is nothing to search:"
                            f" leave out --search and --trials, or {looking[0]}")
    if not args.search:
        raise NanotuneError("--trials draws settings for --search: add --search NAME=LOW:HIGH (or NAME=V1,V2,...)")
    if args.val_data is None and args.val_split == 0:
        raise NanotuneError("a search ranks its trials by validation loss: give --val-data or a --val-split above 0")
    space = parse(args.search, parser, args.trials)
    trials = draw(space, args.trials, args.seed)
    for settings in trials:
        overrides = {parser_dest(parser, k): v for k, v in settings.items()}
        start = check(argparse.Namespace(**vars(args) | overrides | {"search": None, "trials": None}))
    out = Path(args.out)
    folder = output.RunFolder(out).claim(start)
    results_path = out / "search.json"
    done = {}
    if start == "resume" or results_path.is_file():
        try:
            done = {t["name"]: t for t in json.loads(results_path.read_text())["trials"] if t.get("status") == "done"}
        except (OSError, json.JSONDecodeError, KeyError):
            done = {}
    write_json(vars(args) | {"plain": list(args.plain) if args.plain else None}, out / "args.json")
    stop = {"signal": None}
    note_signal = lambda signum, frame: stop.update(signal=signum)
    previous = {s: signal.signal(s, note_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    records = []
    try:
        for i, settings in enumerate(trials, start=1):
            name = f"trial-{i:03d}"
            trial_out = out / "search" / name
            cmd = command(args, parser, settings, trial_out)
            record = {"name": name, "settings": settings, "seed": args.seed, "command": " ".join(cmd[1:])}
            if name in done and done[name]["settings"] == settings:
                records.append(done[name])
                say(f"{name}: done before ({', '.join(f'{k}={v}' for k, v in settings.items())}), validation"
                    f" loss {done[name]['loss']:.4f}")
                continue
            flags = " ".join(f"--{k} {v}" for k, v in settings.items())
            say(f"{name} of {len(trials)}: {flags}\n  $ python {record['command']}")
            if trial_out.exists():
                cmd.append("--resume")                         # a trial stopped half-way continues where it stopped
            code = subprocess.run(cmd, preexec_fn=_default_signals).returncode
            scores = best_scores(trial_out)
            if stop["signal"] is not None or code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
                records.append(record | {"status": "stopped"})
                _save(results_path, space, args, records, trials, i)
                say(f"search stopped during {name}: continue it with the same command plus --resume")
                return 128 + (stop["signal"] or signal.SIGINT)
            if code != 0 or scores is None:
                records.append(record | {"status": "failed", "exit_status": code})
                _save(results_path, space, args, records, trials, i)
                raise NanotuneError(f"{name} failed (exit status {code}); its output is above. Fix it, then"
                                    " run the same command plus --resume")
            records.append(record | {"status": "done"} | scores)
            _save(results_path, space, args, records, trials, i)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    ranked = sorted(records, key=lambda r: r["loss"])
    keep_best(out, out / "search" / ranked[0]["name"])
    say(format_table(ranked, space))
    if plot(ranked, space, out / "search.png"):
        say(f"plot: {out / 'search.png'}")
    say(f"best: {ranked[0]['name']} (validation loss {ranked[0]['loss']:.4f}); its model is in {out}/")
    folder.release()
    return 0


def _default_signals():
    """In a trial's process: Ctrl-C reaches train.py as usual (it saves a resumable state)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _save(path, space, args, records, trials, upto):
    pending = [{"name": f"trial-{i:03d}", "settings": s, "status": "pending"}
               for i, s in enumerate(trials, start=1) if i > upto]
    write_json({"space": {k: list(v) for k, v in space.items()}, "seed": args.seed, "trials": records + pending}, path)


def keep_best(out, best):
    """The best trial's model files, copied into OUT (each written atomically)."""
    for name in output.MODEL_FILES:
        if (best / name).is_file():
            copy_file(best / name, out / name)
        elif (out / name).is_file():
            try:
                (out / name).unlink()                            # left from an earlier best of another kind
            except OSError as e:
                raise cannot_write(out / name, e) from None


def format_table(ranked, space):
    metrics = [k for k in ("perplexity", "accuracy", "macro_f1") if k in ranked[0]]
    header = ["trial", *space, "validation loss", *metrics, "epoch"]
    shown = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    rows = [[r["name"], *(shown(r["settings"][k]) for k in space), f"{r['loss']:.4f}",
             *(f"{r[m]:.4f}" for m in metrics), str(r.get("epoch", ""))] for r in ranked]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header)] + [line(r) for r in rows])


def plot(ranked, space, path):
    """Validation loss against each searched setting (needs matplotlib; nothing without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(space), figsize=(4 * len(space), 3.2), squeeze=False)
    for ax, name in zip(axes[0], space):
        values = [r["settings"][name] for r in ranked]
        ax.scatter(values, [r["loss"] for r in ranked])
        if all(isinstance(v, (int, float)) for v in values) and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("validation loss")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return True
