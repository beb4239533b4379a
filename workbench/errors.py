"""The one exception type the workbench raises for bad input.

Every user-facing failure (unknown model, malformed prompts file, prompt too long, unwritable
output, ...) is a :class:`WorkbenchError` whose message says what is wrong *and* how to fix it.
The CLI turns it into one line on stderr and a non-zero exit; Python users can catch it.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Bad input or environment, with a message that names the fix."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(message if fix is None else f"{message}\n  fix: {fix}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during work that keeps what it finished: ``message`` says what was saved and
    ``fix`` how to go on; the CLI prints both instead of "no results written"."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        self.message, self.fix = message, fix
        super().__init__(message)


class WorkbenchWarning(UserWarning):
    """A result that is computed but may mean little (e.g. a normalising denominator near zero).

    Raised with :func:`warnings.warn`; the CLI prints each as one ``warning:`` line. Python
    users can filter or escalate them by this category."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), for one-line errors."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
