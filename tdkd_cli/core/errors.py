"""tdkd's own error types. Every user-facing failure is one of these; the CLI prints its message
on one line and exits with ``exit_code`` (2 for usage errors, 1 for runtime failures, 3 when an
output could not be written: no space, a read-only file system, no permission)."""

from __future__ import annotations


class TdkdError(Exception):
    """Base class: a failure with a message meant for the user."""

    exit_code = 1


class UsageError(TdkdError):
    """Bad input from the user: a path, an option value, a recipe key, a shape."""

    exit_code = 2


class CheckpointError(TdkdError):
    """A checkpoint or manifest that is missing, corrupt, truncated or of the wrong kind."""

    exit_code = 1


class VerificationError(TdkdError):
    """A numerical check failed (e.g. a merged model does not match its MPO form)."""

    exit_code = 1


class OutputError(TdkdError):
    """The operating system refused to write an output (no space left, read-only file system,
    permission denied): nothing partial is left, earlier outputs are whole; exit code 3."""

    exit_code = 3


class Interrupted(TdkdError):
    """SIGINT/SIGTERM during training: a checkpoint was saved; exit code 130."""

    exit_code = 130


class TrainingDiverged(TdkdError):
    """The loss or the gradient norm became NaN or infinite."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a
    one-line error shows of a library's failure."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
