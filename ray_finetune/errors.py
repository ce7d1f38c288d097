"""Exceptions users see (SPEC §6). Bad input is a ValidationError that says what to fix, never a traceback."""
from __future__ import annotations


class RayFinetuneError(Exception):
    """Base of every error ray_finetune raises on purpose."""


class ValidationError(RayFinetuneError, ValueError):
    """Bad user input: names the parameter and, for data, the file and the line."""

    def __init__(self, parameter: str, problem: str, *, file: str | None = None, line: int | None = None,
                 expected: str | None = None) -> None:
        self.parameter, self.problem, self.file, self.line, self.expected = parameter, problem, file, line, expected
        where = f" in {file}" if file else ""
        where += f", line {line}" if line is not None else ""
        text = f"{parameter}{where}: {problem}"
        if expected:
            text += f"; expected {expected}"
        super().__init__(text)

    def __reduce__(self):   # keyword-only fields: pickle (Ray) would otherwise fail to rebuild it
        return _rebuild_validation_error, (self.parameter, self.problem, self.file, self.line, self.expected)


def _rebuild_validation_error(parameter, problem, file, line, expected) -> ValidationError:
    return ValidationError(parameter, problem, file=file, line=line, expected=expected)


class RunNotFoundError(RayFinetuneError, LookupError):
    """No run of that name in the event log."""


class ConfigError(RayFinetuneError):
    """The environment or the cluster is not set up the way ray_finetune needs."""


class ResponseError(RayFinetuneError):
    """The scheduler or another actor answered with an error."""


class CheckpointError(RayFinetuneError):
    """A checkpoint could not be written or read (disk full, unwritable storage, torn files)."""


class TrainingDivergedError(RayFinetuneError):
    """A step's loss or gradient was not a finite number: nothing after it is saved or registered."""


class RegistrationError(RayFinetuneError):
    """Training ended, but its final model could not be registered; the final checkpoint is intact."""


def one_line(error: BaseException) -> str:
    """Someone else's error (a storage or tracking client's, a library's, a chat template's) as one line of a message
    of ours, which an event or a table row shows: its type and its message, whose lines (object stores and HTTP
    clients write several) are joined."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
