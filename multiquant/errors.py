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


class UserCodeError(UserError):
    """The user's own code (a family's sampler, metric or denoiser forward) raised: the message names which part
    and the error in one line; ``--debug`` shows the user's traceback (chained as the cause)."""


def _raised_by_us(tb) -> bool:
    """Whether the deepest frame below the ``with`` that is neither torch, numpy nor the standard library is this
    project's (a bug of ours called from the user's code, e.g. a quantized layer in their forward: it keeps its
    traceback) rather than the user's."""
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ours = tuple(str(root / name) + "/" for name in ("multiquant", "autobuild", "qua2sedimo"))
    library = tuple(str(Path(p).resolve()) + "/" for p in {sysconfig.get_paths()["stdlib"]} | _library_dirs())
    last = None
    tb = tb.tb_next if tb is not None else None  # the first frame holds the `with`: ours by construction
    while tb is not None:
        name = str(Path(tb.tb_frame.f_code.co_filename).resolve())
        if not name.startswith(library):
            last = name
        tb = tb.tb_next
    return last is not None and last.startswith(ours)


def _library_dirs() -> set:
    import importlib.util
    from pathlib import Path

    dirs = set()
    for name in ("torch", "numpy"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.add(str(Path(spec.origin).parent))
    return dirs


class user_code:
    """``with user_code("family 'x': its sampler"):`` turns an exception of the user's code into one
    :class:`UserCodeError` line (a UserError passes through unchanged). For code the user wrote, never ours: ours
    keeps its traceback as a bug."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, UserError) or not isinstance(err, Exception) or _raised_by_us(tb):
            return False
        text = " ".join(str(err).split())[:300]
        raise UserCodeError(f"{self.what} raised {type(err).__name__}{': ' + text if text else ''} "
                            f"(--debug shows its traceback)") from err


def user_forward(family, model):
    """The context of a denoiser forward on the family's example inputs: a plain-module family's forward is the
    user's code (its failure is one :class:`UserCodeError` line); a built-in pipeline's is ours."""
    from contextlib import nullcontext

    return (user_code(f"family {family.name!r}: {type(model).__name__}.forward on its example_inputs")
            if getattr(family, "is_module", False) else nullcontext())
