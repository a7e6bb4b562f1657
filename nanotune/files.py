"""Writing files so that a crash, a full disk or a read-only folder never leaves half of one.

Every file nanotune writes (model, adapter, tokenizer, training state, metrics, plots, exports,
search records) goes through `atomic_write`: the bytes go to a temporary file in a folder of its
own beside the target, reach the disk, and only then is the temporary file renamed over the
target. A kill at any moment leaves either the old file or the new one, never a mix. An
operating-system error on the way (no space, a read-only disk, no permission) becomes one
`NanotuneError` line naming the file, and what was there before stays as it was.
"""
import json
import os
import secrets
from pathlib import Path

from .errors import NanotuneError


def cannot_write(path, error) -> NanotuneError:
    """The one line for a write the operating system refused."""
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    return NanotuneError(f"cannot write {path}: {reason}; what was there before is unchanged:"
                         " free some space, make the folder writable, or choose another folder")


def _io_failure(error) -> bool:
    """An OS error, or a writer's own error that wraps one (safetensors and torch.save report a
    failed write in their own exception types)."""
    text = str(error)
    return isinstance(error, OSError) or "IoError" in text or "file write failed" in text


def atomic_write(path, write) -> None:
    """Call write(tmp_path), then rename over `path`. `tmp_path` lies in a folder of its own beside
    the target, `.NAME.RANDOM.tmp/`, which nanotune names and removes: whatever temporaries the
    writer makes there itself (safetensors writes its own `.tmpXXXXXX` beside the file it is given
    and renames it) are nanotune's too, so a kill at any instant leaves only that folder, which the
    next run in the output folder removes. The file is created like any other (the umask decides
    who may read it), and its bytes reach the disk before the rename."""
    path = Path(path)
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            staging = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
            try:
                staging.mkdir()
                break
            except FileExistsError:
                continue
        tmp = staging / path.name
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode              # 0o666 less the umask, as for any new file
        write(str(tmp))
        os.chmod(tmp, mode)                      # some writers (safetensors) recreate the file as 0o600
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, "O_DIRECTORY"):           # and the rename itself, so a power cut cannot undo it
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except Exception as e:
        if _io_failure(e):
            raise cannot_write(path, e) from None
        raise
    finally:
        if staging is not None:
            remove_staging(staging)


def remove_staging(folder) -> None:
    """An atomic_write's `.NAME.RANDOM.tmp/` folder and what a writer left in it."""
    import shutil
    shutil.rmtree(folder, ignore_errors=True)


def write_json(obj, path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def copy_file(source, target) -> None:
    """Copy a file into place atomically."""
    import shutil
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def append_line(path, line) -> None:
    """Append one line (metrics.jsonl): a kill can cut only the last line short, which readers skip."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise cannot_write(path, e) from None
