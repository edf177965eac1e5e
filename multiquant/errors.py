"""Bad input, said in one line.

:class:`UserError` is the base of every error caused by what the user gave (a path, a flag, a file's content):
its message names the problem and the fix, in one line. The command line prints it as ``error: <message>`` and
exits 2 with no traceback (``--debug`` shows it). Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""

    exit_code = 2


class MissingFileError(UserError, FileNotFoundError):
    """A file the user named (or a command needs) does not exist; the message says how to get it."""


class InputError(UserError, ValueError):
    """A file or value the user gave has the wrong content (also a ValueError, for older callers)."""


class SetupError(UserError, RuntimeError):
    """What a command needs is not there (weights that do not load, an optional package, a launcher setting);
    the message says how to provide it (also a RuntimeError, for older callers)."""


class WriteError(UserError, OSError):
    """A file could not be written (disk full, quota, no permission, read-only file system): nothing was
    replaced; the message says what to free or fix (also an OSError with the cause's ``errno``, for older
    callers)."""

    def __str__(self) -> str:  # the one line, not OSError's "[Errno N] ..." form
        return str(self.args[0]) if self.args else ""
