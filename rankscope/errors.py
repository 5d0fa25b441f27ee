"""The exceptions rankscope raises; the CLI turns each into one line and exit status 2."""


class RankscopeError(Exception):
    """Base class: a problem with the user's input or files, stated in one line."""


class InputError(RankscopeError, ValueError):
    """Bad input: a missing path, wrong shapes, a corrupt or mismatched file, NaN or Inf."""


class ModelNotFoundError(RankscopeError):
    """A model name the registry cannot resolve (unknown, or a hub id while offline)."""
