"""The exceptions kd-optuna raises on purpose, and ``error_message``/``first_line`` to quote one.

Every error a user can cause by input derives from :class:`KdOptunaError`; the command line
turns it into a one-line message and exit code 2.
"""


class KdOptunaError(Exception):
    """Base class: an error with a message that names the problem and the fix."""


class InvalidSpace(KdOptunaError, ValueError):
    """A gene name or an option that the search space does not have."""


class InvalidDistiller(KdOptunaError):
    """A distiller spec that cannot be computed for the given shapes, or gave a non-finite loss.

    ``reason`` is short and stable enough to be counted (it is stored as ``reject_reason``).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TrainingDiverged(KdOptunaError):
    """The full training's loss became non-finite. ``reason`` says when ("the loss became nan
    in epoch 2"); the message adds the fix. ``kd-optuna compare`` records it as the run's outcome."""

    def __init__(self, reason: str, fix: str = "lower --lr"):
        super().__init__(f"{reason}; {fix}")
        self.reason = reason


def error_message(error: BaseException) -> str:
    """``str(error)``, stripped. An exception that torch re-raised from a DataLoader worker reads
    "Caught T in DataLoader worker process N.", the worker's traceback, then
    "module.T: text": its message is that ``text``, what the worker raised."""
    text = str(error).strip()
    lines = text.splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        kind = type(error)
        prefix = f"{kind.__module__}.{kind.__qualname__}: "
        for line in reversed(lines):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return text


def first_line(error: BaseException, limit: int = 160, default: str = "") -> str:
    """The first line of :func:`error_message` of ``error``, cut to ``limit`` characters;
    ``default`` when the message is empty."""
    text = error_message(error)
    return text.splitlines()[0][:limit] if text else default
