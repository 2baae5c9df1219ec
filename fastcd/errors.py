"""The exceptions fastcd raises for bad inputs. Each says in one line which argument is wrong and what was
expected. They subclass the built-in types (``UsageError`` is a ``ValueError``), so ``except ValueError`` still
catches them; the command line prints them as one line (exit status 2), while any other exception is an
internal error and keeps its traceback (``--debug`` shows the traceback of a usage error too)."""


class UsageError(ValueError):
    """A bad argument, configuration, file or combination of them."""


class InputFileError(UsageError, FileNotFoundError):
    """A file or directory an argument names does not exist (or lacks what it must hold)."""


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong kind (e.g. a class where an object is expected)."""


class NotApplicable(ValueError):
    """A run that cannot be made for this matching (e.g. a permuted control with a single teacher unit): an
    experiment records it as not applicable and goes on. Not a usage error."""


__all__ = ["InputFileError", "NotApplicable", "UsageError", "UsageTypeError"]
