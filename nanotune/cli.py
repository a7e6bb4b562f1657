"""What train.py and generate.py share: help text with defaults, and errors for people."""
import argparse
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
