"""What train.py and generate.py share: a parser whose every flag is checked as it is read, help
text with defaults, and errors for people (one line, exit status 2, no traceback)."""
import argparse
import math
import os
import sys

from ..errors import NanotuneError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth reading."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with nanotune's way of failing: a bad flag prints one line and exits with status 2
    (argparse's own way prints the whole usage first, which buries the one line that matters)."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ---- flag types: each converts a value or says, in one line, what range is allowed ----------

def whole_number(low, high=None):
    """An int flag in [low, high]."""
    allowed = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"

    def convert(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number: give {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {allowed}")
        return value
    return convert


def number(low=None, high=None, low_open=False, high_open=False):
    """A finite float flag within the given bounds (open or closed at each end)."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = (f"a number in {left}{low}, {high}{right}" if high is not None
               else f"a number {'>' if low_open else '>='} {low}" if low is not None else "a finite number")

    def convert(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: give {allowed}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {allowed}")
        return value
    return convert


def text(what):
    """A string flag that must not be empty (an empty one is almost always a shell-quoting slip)."""
    def convert(value):
        if not value.strip():
            raise argparse.ArgumentTypeError(f"it is empty: give {what}")
        return value
    return convert


def device(name):
    """A torch device that this machine has: cpu, cuda, cuda:N, mps, ..."""
    import torch
    try:
        d = torch.device(name)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: use cpu, cuda or cuda:N") from None
    if d.type == "cpu":
        return name
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{name}: this machine has no usable CUDA GPU: use cpu, or leave"
                                             " --device out")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{name}: this machine has {torch.cuda.device_count()} CUDA"
                                             " device(s), numbered from 0")
        return name
    backend = getattr(torch.backends, d.type, None) or getattr(torch, d.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise argparse.ArgumentTypeError(f"{name}: this machine has no {d.type} device: use cpu, or leave --device out")
    return name


def native_bf16(device) -> bool:
    """Whether this device multiplies bf16 matrices in hardware: CPUs with AVX512-BF16 or AMX, CUDA
    GPUs from Ampere on. There bf16 autocast trains at 2-3x fp32's matrix-product speed; elsewhere
    bf16 is emulated and gains little."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        flags = torch._C._cpu._get_cpu_capability()     # PyTorch's own reading of the CPU's features
    except (AttributeError, RuntimeError):
        return False
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def trick_names(value):
    """--plain's value: "all", or trick names separated by commas (nanotune/tricks.py lists them)."""
    from .. import tricks
    names = tricks.NAMES if value == "all" else tuple(n.strip() for n in value.split(","))
    unknown = [n for n in names if n not in tricks.NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{value!r}: give no value for all tricks, or some of"
                                         f" {', '.join(tricks.NAMES)}")
    return names


def add_plain_flag(parser):
    """--plain, the same on train.py and generate.py."""
    from .. import tricks
    g = parser.add_argument_group("reading the code")
    g.add_argument("--plain", nargs="?", const="all", type=trick_names, metavar="TRICKS",
                   help="turn the speed tricks off and run the textbook version of every step (or only of TRICKS,"
                        f" comma-separated: {', '.join(tricks.NAMES)}); see nanotune/tricks.py")


def use_colour(stream=sys.stdout):
    """Colour on a terminal that shows it, unless NO_COLOR is set."""
    return stream.isatty() and os.environ.get("NO_COLOR") is None and os.environ.get("TERM") != "dumb"


def default_device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def run(main, parse_args):
    """Run a command: a user mistake prints one line and exits with status 2, no traceback."""
    try:
        sys.exit(main(parse_args()))
    except NanotuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        # The disk or the network said no (full, read-only, no permission) somewhere a file of
        # ours was not expected: still one line, not a traceback. Bugs are not OSErrors.
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}: check the disk and the folder's permissions", file=sys.stderr)
        sys.exit(2)
