"""Mistakes a user can make, as exceptions whose message is the whole story.

A command catches `UserError`, prints its message on one line and exits with code 2 (see
`common.cli`). Messages start with the thing that is wrong (a path, a config key) and say what is
wrong with it, so no traceback is needed.
"""

from __future__ import annotations


class UserError(Exception):
    """Base class for every mistake a user can fix: bad arguments, missing or unusable files."""
