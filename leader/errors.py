"""Errors a user can act on. The CLI prints them as one line; `--debug` shows the traceback."""


class LeaderError(Exception):
    """Something the user can fix: a wrong path, a mismatched cache, a bad setting.

    The message must name the file, key, teacher or setting at fault.
    """
