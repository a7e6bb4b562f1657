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
import os
from pathlib import Path

from .errors import NanotuneError

LOCK = ".nanotune.lock"
MODEL_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "adapter_config.json", "adapter_model.safetensors"}
RUN_FILES = {"args.json", "metrics.jsonl", "loss.png", "quantization.json"}
STATE = ("checkpoint", "training_state.pt")
SUBFOLDERS = {"checkpoint": {"training_state.pt"}, "merged": MODEL_FILES}
# Files that only nanotune writes: a folder holding one of them is a nanotune run folder.
MARKERS = ("args.json", "metrics.jsonl", "checkpoint/training_state.pt")


def is_temporary(name):
    """hub.atomic_write's temporary files, `.NAME.RANDOM.tmp`, left behind if a run was killed mid-write."""
    return name.startswith(".") and name.endswith(".tmp")


def _entries(folder: Path, allowed=MODEL_FILES | RUN_FILES, subfolders=SUBFOLDERS):
    """(the nanotune files in folder, the other files), as paths relative to folder; the lock and
    temporary files are neither."""
    ours, foreign = [], []
    if not folder.is_dir():
        return ours, foreign
    for entry in sorted(folder.iterdir()):
        if entry.name == LOCK or is_temporary(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink() and entry.name in subfolders:
            inner_ours, inner_foreign = _entries(entry, subfolders[entry.name], {})
            ours += [f"{entry.name}/{n}" for n in inner_ours] or ([entry.name] if not inner_foreign else [])
            foreign += [f"{entry.name}/{n}" for n in inner_foreign]
        elif entry.is_file() and not entry.is_symlink() and entry.name in allowed:
            ours.append(entry.name)
        else:
            foreign.append(entry.name)
    return ours, foreign


def _inside(path: Path, folder: Path):
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _writable(folder: Path):
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NanotuneError(f"--out {folder}: {existing} is a file, so the folder cannot be made there: choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NanotuneError(f"--out {folder}: no permission to write in {existing}: choose a folder you can write to")
    for sub in SUBFOLDERS:
        if (folder / sub).is_dir() and not os.access(folder / sub, os.W_OK | os.X_OK):
            raise NanotuneError(f"--out {folder}: no permission to write in {folder / sub}: fix its permissions or choose another --out")


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
        raise NanotuneError(f"--out {out} is in use by another nanotune run (process {held_by}): wait for it to finish, or choose another --out")
    ours, foreign = _entries(out)
    if not ours and not foreign:
        return "restart" if resume else "new"
    for flag, path in inputs:
        if path is not None and _inside(Path(path), out):
            relation = "is" if Path(path).resolve() == out.resolve() else "holds"
            raise NanotuneError(f"--out {out} {relation} the {flag} {path}, which this run reads: write the run to another folder")
    has_state = (out / STATE[0] / STATE[1]).is_file()
    is_run = any((out / m).is_file() for m in MARKERS)
    if resume and has_state:
        return "resume"
    if not (resume or overwrite):
        hint = "add --resume to continue that run, or --overwrite to replace it" if is_run else "it is not a nanotune run folder"
        raise NanotuneError(f"--out {out} already has files: choose another --out ({hint})")
    if foreign or not is_run:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "") if foreign else ", ".join(ours[:4])
        raise NanotuneError(f"--out {out} holds files that nanotune did not write ({shown}), so nanotune will not replace it:"
                            " choose another --out, or empty that folder yourself")
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
        "restart" remove the earlier run's files (only nanotune's: `check` refused anything else)."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                os.close(fd)
                raise NanotuneError(f"--out {self.out} is in use by another nanotune run (process {lock_holder(self.out)}):"
                                    " wait for it to finish, or choose another --out")
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
        for folder in [self.out] + [self.out / sub for sub in SUBFOLDERS]:
            if folder.is_dir():
                for entry in folder.iterdir():
                    if is_temporary(entry.name) and entry.is_file():
                        entry.unlink()
        if mode in ("overwrite", "restart"):
            ours, _ = _entries(self.out)
            for name in sorted(ours, key=lambda n: -n.count("/")):      # files first, then their folders
                target = self.out / name
                target.rmdir() if target.is_dir() else target.unlink()
            for sub in SUBFOLDERS:
                if (self.out / sub).is_dir() and not any((self.out / sub).iterdir()):
                    (self.out / sub).rmdir()
        return self

    def release(self):
        if self.fd is None:
            return
        try:
            (self.out / LOCK).unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def trim_metrics(self, step: int):
        """Keep the metrics of steps up to `step`, where a resumed run continues: the steps after it
        are redone, and logging them twice would draw the loss curve wrong. A line cut short by a
        kill is dropped too."""
        from .hub import atomic_write
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
