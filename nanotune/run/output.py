"""The output folder of a training run: checked before anything is written, held by one run at a
time, and never emptied of anything nanotune did not write itself.

`check` only reads. It runs before anything is loaded, and it decides what starting in OUT means:
a new run, a resumed one, or one that replaces an earlier nanotune run (`--overwrite`). A folder
that holds files nanotune does not write (a source tree, the working directory, a downloaded
model), or that holds the model or data the run reads, is refused. Only after every other check
has passed does `RunFolder.claim` take the lock and touch the disk.
"""
import atexit
import json
import math
import os
import re
from pathlib import Path

from ..errors import NanotuneError
from ..files import atomic_write, cannot_write, remove_staging, write_json

LOCK = ".nanotune.lock"
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja",
               "adapter_config.json", "adapter_model.safetensors"}
RUN_FILES = {"args.json", "metrics.jsonl", "loss.png", "training.png", "quantization.json", "search.json", "search.png",
             "lr_find.json", "lr_find.png"}
STATES = ("checkpoint/training_state.pt", "search.json")      # where a run (or a search) can continue from


class Matching:
    """File names given by a pattern, usable where a set of names is."""

    def __init__(self, pattern):
        self.pattern = re.compile(pattern)

    def __contains__(self, name):
        return bool(self.pattern.fullmatch(name))


SHARDS = (Matching(r"\.metadata|__\d+_\d+\.distcp"), {})      # an FSDP state: torch.distributed.checkpoint's files
# (file names allowed, {subfolder: its rule}): what nanotune writes in a run folder
RUN = (MODEL_FILES | RUN_FILES, {"checkpoint": ({"training_state.pt"}, {"sharded-a": SHARDS, "sharded-b": SHARDS}),
                                 "merged": (MODEL_FILES, {})})
TRIAL = re.compile(r"trial-\d{3,}$")        # a hyper-parameter search's trials: OUT/search/trial-NNN, each a run folder
# Files that only nanotune writes: a folder holding one of them is a nanotune run folder.
MARKERS = ("args.json", "metrics.jsonl", "checkpoint/training_state.pt", "search.json")


TEMPORARY = re.compile(r"\..+\.tmp|\.tmp[A-Za-z0-9]{6}")


def is_temporary(name):
    """What a run killed mid-write leaves: files.atomic_write's `.NAME.RANDOM.tmp` (a folder, and
    a file in earlier versions), or safetensors' own `.tmpXXXXXX`, which earlier versions let it
    write straight into the output folder."""
    return bool(TEMPORARY.fullmatch(name))


def _entries(folder: Path, rule=RUN, top=True):
    """(the nanotune files in folder, the other files), as paths relative to folder; locks and
    temporary files are neither. An empty nanotune subfolder counts as a file of ours."""
    allowed, subfolders = rule
    ours, foreign = [], []
    if not folder.is_dir():
        return ours, foreign
    for entry in sorted(folder.iterdir()):
        if entry.name == LOCK or is_temporary(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink() and (entry.name in subfolders or (top and entry.name == "search")):
            if entry.name == "search":
                inner_ours, inner_foreign = [], []
                for trial in sorted(entry.iterdir()):
                    if trial.is_dir() and TRIAL.match(trial.name):
                        o, f = _entries(trial, RUN, top=False)
                        inner_ours += [f"{trial.name}/{n}" for n in o] or ([trial.name] if not f else [])
                        inner_foreign += [f"{trial.name}/{n}" for n in f]
                    elif not is_temporary(trial.name):
                        inner_foreign.append(trial.name)
            else:
                inner_ours, inner_foreign = _entries(entry, subfolders[entry.name], top=False)
            ours += [f"{entry.name}/{n}" for n in inner_ours] or ([entry.name] if not inner_foreign else [])
            foreign += [f"{entry.name}/{n}" for n in inner_foreign]
        elif entry.is_file() and not entry.is_symlink() and entry.name in allowed:
            ours.append(entry.name)
        else:
            foreign.append(entry.name)
    return ours, foreign


def _subfolders(folder: Path, rule=RUN):
    """The subfolders a rule allows under `folder`, deepest first."""
    return [d for name, inner in rule[1].items() for d in _subfolders(folder / name, inner) + [folder / name]]


def _nanotune_dirs(out: Path):
    """The subfolders nanotune writes under `out`, deepest first."""
    dirs = _subfolders(out)
    if (out / "search").is_dir():
        trials = [t for t in (out / "search").iterdir() if t.is_dir() and TRIAL.match(t.name)]
        dirs += [d for t in trials for d in _subfolders(t)] + trials + [out / "search"]
    return [d for d in dirs if d.is_dir() and not d.is_symlink()]


def _inside(path: Path, folder: Path):
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _writable(folder: Path):
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NanotuneError(f"--out {folder}: {existing} is a file, so the folder cannot be made there:"
                            " choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NanotuneError(f"--out {folder}: no permission to write in {existing}: choose a folder you can write to")
    for sub in RUN[1]:
        if (folder / sub).is_dir() and not os.access(folder / sub, os.W_OK | os.X_OK):
            raise NanotuneError(f"--out {folder}: no permission to write in {folder / sub}: fix its"
                                " permissions or choose another --out")


def check(out, resume, overwrite, inputs=()) -> str:
    """What starting a run in `out` means, without writing anything: "new", "resume", "restart"
    (--resume, but no training state was saved yet: start from the beginning) or "overwrite".
    `inputs` are (flag, local path) pairs of what the run reads (the model folder, the data files):
    OUT must not hold them, because a run replaces what it finds there."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NanotuneError(f"--out {out} is a file: give a folder")
    if resume and overwrite:
        raise NanotuneError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    _writable(out)
    held_by = lock_holder(out)
    if held_by is not None:
        raise NanotuneError(f"--out {out} is in use by another nanotune run (process {held_by}): wait for it"
                            " to finish, or choose another --out")
    ours, foreign = _entries(out)
    if not ours and not foreign:
        return "restart" if resume else "new"
    for flag, path in inputs:
        if path is not None and _inside(Path(path), out):
            relation = "is" if Path(path).resolve() == out.resolve() else "holds"
            raise NanotuneError(f"--out {out} {relation} the {flag} {path}, which this run reads: write the"
                                " run to another folder")
    has_state = any((out / state).is_file() for state in STATES)
    is_run = any((out / m).is_file() for m in MARKERS)
    if resume and has_state:
        return "resume"
    if not (resume or overwrite):
        hint = ("add --resume to continue that run, or --overwrite to replace it" if is_run
                else "it is not a nanotune run folder")
        raise NanotuneError(f"--out {out} already has files: choose another --out ({hint})")
    if foreign or not is_run:
        more = f" and {len(foreign) - 4} more" if len(foreign) > 4 else ""
        shown = ", ".join(foreign[:4]) + more if foreign else ", ".join(ours[:4])
        raise NanotuneError(f"--out {out} holds files that nanotune did not write ({shown}), so nanotune will not"
                            " replace it: choose another --out, or empty that folder yourself")
    return "restart" if resume else "overwrite"


# ---- one run per folder ----------------------------------------------------------------------

def _try_lock(fd):
    """An exclusive, non-blocking lock on an open file; False if another process holds it. The
    operating system releases it when the process ends, however it ends (kill -9 included)."""
    try:
        import fcntl
    except ImportError:                          # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def lock_holder(out: Path):
    """The process id of the run that holds `out`'s lock, or None (no lock, or one a killed run left)."""
    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            return None                          # nobody holds it; closing the file releases ours
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


class RunFolder:
    """The run's hold on OUT: the lock file (with this process's id in it, for the message a second
    run prints) and the clean-up that makes an interrupted folder usable again."""

    def __init__(self, out):
        self.out = Path(out)
        self.fd = None

    def claim(self, mode: str):
        """Take the lock, remove what a killed run left half-written, and for "overwrite" and
        "restart" remove the earlier run's files (only nanotune's: `check` refused anything else).
        A folder the operating system will not let us write is one line, with nothing changed."""
        try:
            return self._claim(mode)
        except OSError as e:
            raise cannot_write(e.filename or self.out, e) from None

    def _claim(self, mode):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                os.close(fd)
                raise NanotuneError(f"--out {self.out} is in use by another nanotune run (process"
                                    f" {lock_holder(self.out)}): wait for it to finish, or choose another --out")
            try:       # a run that just finished may have removed the file we opened: lock the one that is there
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        atexit.register(self.release)           # however the run ends; a killed one's lock the OS releases
        replace = mode in ("overwrite", "restart")
        for folder in [self.out] + _nanotune_dirs(self.out):
            for entry in folder.iterdir():
                # half-written files of a killed run; when replacing, also the locks its trials left
                stale_lock = replace and entry.name == LOCK and folder != self.out
                if entry.is_dir() and not entry.is_symlink() and is_temporary(entry.name):
                    remove_staging(entry)
                elif entry.is_file() and (is_temporary(entry.name) or stale_lock):
                    entry.unlink()
        if replace:
            ours, _ = _entries(self.out)
            for name in ours:
                if (self.out / name).is_file():
                    (self.out / name).unlink()
            for folder in _nanotune_dirs(self.out):              # deepest first: each is empty by now
                if not any(folder.iterdir()):
                    folder.rmdir()
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            (self.out / LOCK).unlink()
        except OSError:             # gone already, or the disk went read-only: the OS releases the lock anyway
            pass
        os.close(self.fd)
        self.fd = None

    def trim_metrics(self, step: int):
        """Keep the metrics of steps up to `step`, where a resumed run continues: the steps after it
        are redone, and logging them twice would draw the loss curve wrong. A line cut short by a
        kill is dropped too."""
        path = self.out / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept), encoding="utf-8"))


# ---- the run's hold on OUT, from its first write to its end ----------------------------------

def take(args, run, model, optimizer, training=True, records=None):
    """Lock --out (one run per folder), clear what a killed run left half-written, and for a
    resumed run load the saved state. A training run also records its settings (OUT/args.json) and
    the `records` given ({file name: JSON or None}), and cuts the metrics back to where it resumes; a
    finding mode (--lr-find) leaves the run's records as they are. Returns where training starts."""
    from .checkpoint import load_state
    from .distributed import barrier
    out = Path(args.out)
    barrier()                                    # every rank has checked --out before rank 0 locks it
    folder = RunFolder(out).claim(run.start) if run.main_process else None
    barrier()
    progress = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best": math.inf, "bad_epochs": 0}
    if run.start == "resume":
        progress = load_state(out / "checkpoint", model, optimizer, sharded=args.fsdp)
        run.print(f"resuming at epoch {progress['epoch'] + 1}, step {progress['step']}")
    elif run.start == "restart":
        run.print(f"note: {out} holds no saved training state yet, so --resume starts the run from the beginning")
    if run.main_process and training:
        folder.trim_metrics(progress["step"])    # the steps after it are about to be redone
        record_settings(out, args, run.start == "resume", run.print)
        for name, record in (records or {}).items():
            if record is not None:
                write_json(record, out / name)
    return progress


def record_settings(out, args, resumed, say):
    """OUT/args.json: the run's settings. A resumed run is told which ones it changed."""
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
    path = out / "args.json"
    if resumed and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            before = {}
        changed = [f"--{k.replace('_', '-')} {settings[k]} (was {before[k]})" for k in settings
                   if k in before and before[k] != settings[k] and k not in ("stop_after_epochs", "device")]
        if changed:
            say("note: resuming with settings that differ from the interrupted run's: " + ", ".join(changed))
    write_json(settings, path)
