"""The one exception class for user mistakes.

A `NanotuneError` says what is wrong and what to do about it, in one line.
`train.py` and `generate.py` catch it, print the message and exit with status 2.
Bugs are not NanotuneErrors: they still raise with a traceback.
"""


class NanotuneError(Exception):
    pass
