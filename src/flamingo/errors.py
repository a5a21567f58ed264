"""The user-error family.

Every mistake a user can make (a bad config field, a missing or damaged file, an invalid option,
a malformed request) raises a subclass of `UserError`. The CLI turns these, and only these, into
one line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
`UserError` subclasses `ValueError` so that callers which catch `ValueError` keep working.
A feature whose optional packages are not installed raises `MissingExtra` (exit code 1), naming the extra.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(ValueError):
    """A mistake in the user's input: the message names the file, field or option, and what was expected."""


class CheckpointError(UserError):
    """A checkpoint does not match the model (missing, unexpected or mis-shaped tensors)."""


def cannot_load(field: str, name: str, err: Exception) -> UserError:
    """A user-named model or file that its library could not open, as one line: the field, the
    name and the first line of the library's reason."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return UserError(f"{field} {str(name)[:300]!r} cannot be loaded: {reason}")


class MissingExtra(ImportError):
    """A feature's optional packages are not installed. The message is one line naming the `pip install`
    that brings them (the CLI prints it alone, exit code 1)."""


def import_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import `module`, which the `extra` extra of the package installs (the core install leaves the
    server, metrics, video, plotting and dedup stacks out); when it is missing, raise MissingExtra:
    "FEATURE needs the EXTRA extra: pip install 'flamingo[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken (one of its own imports failed): its own error says how
        raise MissingExtra(f"{feature} needs the {extra} extra: pip install 'flamingo[{extra}]'") from err
