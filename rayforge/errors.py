"""One exception type for every error a user can cause (bad input, bad artifacts).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class RayforgeError(Exception):
    """A user-facing error: the message says what is wrong and where."""

    exit_code = 1


class MalformedArtifact(RayforgeError):
    """A log, PoR or dataset file that is missing, truncated, or of the wrong schema or shape."""

    exit_code = 2


class UnusableInput(RayforgeError):
    """An input a verification cannot use: a missing dataset, an unreadable --model or --data-root, a bad option.
    Exit 2 like a malformed artifact, never 1: for `rayforge verify` exit 1 means the proof was refuted."""

    exit_code = 2
