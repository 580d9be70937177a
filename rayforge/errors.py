"""One exception type for every error a user can cause (bad input, bad artifacts).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class RayforgeError(Exception):
    """A user-facing error: the message says what is wrong and where."""

    exit_code = 1


class MalformedArtifact(RayforgeError):
    """A log, PoR or dataset file that is missing, truncated, or of the wrong schema or shape."""

    exit_code = 2
