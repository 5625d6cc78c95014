"""The one base of every mistake a user can fix: the CLI prints its message alone (no traceback) and exits 2."""


class PeftTunerError(ValueError):
    """Something the user wrote or pointed at cannot work; the message names the key, file or row, and what to do."""
