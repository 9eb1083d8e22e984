"""The simulator floor's mistakes a user can make: a demonstration store or source file at fault.

Both are `common.errors.UserError` (the one class every command catches), so a command prints
their message on one line and exits with code 2.
"""

from __future__ import annotations

from common.errors import UserError


class StoreError(UserError):
    """A demonstration store that is missing, unreadable, inconsistent or of another task."""


class SourceError(UserError):
    """A demonstration file to import (e.g. a robomimic HDF5) that is missing or lacks a field."""
