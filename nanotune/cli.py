"""What train.py and generate.py share: help text with defaults, and errors for people."""
import argparse
import ctypes
import sys

from .errors import NanotuneError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default worth reading."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def run(main, parse_args):
    """Run a command: a user mistake prints one line and exits with status 2, no traceback."""
    try:
        sys.exit(main(parse_args()))
    except NanotuneError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def keep_freed_memory():
    """Ask glibc's malloc to keep the memory PyTorch frees, for the next step to reuse (Linux, CPU).
    By default each block over about 32 MiB (and, until the threshold adapts, over 128 KiB) is an
    mmap of its own, handed back to the kernel when freed; every training step's fresh activations
    and gradients then arrive as new pages that the kernel zeroes on first touch: about 270,000 page
    faults in a bf16 step of GPT-2 124M at 8 x 128 tokens, a sixth of the step. The same cure as
    running PyTorch on CPU with jemalloc or tcmalloc, with the C library already loaded. The price:
    the process keeps its peak memory, and a little more (GPT-2 124M in bf16: peak RSS 3,369 MiB
    instead of 3,290, steady from the fourth step of a 40-step run)."""
    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)     # glibc and musl have it
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    mallopt(M_MMAP_MAX, 0)                  # every block from the heap, none its own mmap
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)    # and the heap's freed top is kept, not given back
