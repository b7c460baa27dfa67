"""The errors imgembed raises for a user to act on: their message says what went wrong and what to
do, and the command line prints it as one line instead of a traceback."""

from __future__ import annotations


class ImgembedError(Exception):
    """An error with a message a user can act on."""
