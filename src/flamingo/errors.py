"""The user-error family.

Every mistake a user can make (a bad config field, a missing or damaged file, an invalid option,
a malformed request) raises a subclass of `UserError`. The CLI turns these, and only these, into
one line on stderr and exit code 2; any other exception is a bug and keeps its traceback.
`UserError` subclasses `ValueError` so that callers which catch `ValueError` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input: the message names the file, field or option, and what was expected."""


def cannot_load(field: str, name: str, err: Exception) -> UserError:
    """A user-named model or file that its library could not open, as one line: the field, the
    name and the first line of the library's reason."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return UserError(f"{field} {str(name)[:300]!r} cannot be loaded: {reason}")
