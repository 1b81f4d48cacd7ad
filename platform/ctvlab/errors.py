"""User-facing errors.

A `CtvlabError` is a problem with the user's data, configuration or environment. The command line
prints its message (never a traceback) and exits with `exit_code`. Anything else is a bug in ctvlab
and keeps its traceback.
"""


class CtvlabError(Exception):
    """An error the user can fix; the message says what was wrong and how to fix it."""

    exit_code = 2


class ConfigError(CtvlabError):
    """A configuration file or option is invalid."""


class DataError(CtvlabError):
    """Input data (a cohort, a prepared dataset, a patient's file) is missing or invalid."""


class LeakageError(CtvlabError):
    """A patient would appear on both sides of a split, or a split does not match its data."""

    exit_code = 3


class InfrastructureError(CtvlabError):
    """The machine failed, not the data: a dead worker, out of memory, a full disk, an I/O error.

    The stage fails and keeps every output it had; running it again once the cause is fixed resumes.
    """

    exit_code = 4
