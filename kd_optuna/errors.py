"""The exceptions kd-optuna raises on purpose, and ``first_line`` to quote another one.

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


def first_line(error: BaseException, limit: int = 160, default: str = "") -> str:
    """The first line of ``str(error)`` (stripped), cut to ``limit`` characters; ``default``
    when the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else default
