"""Errors raised by the data loaders."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable or malformed.

    The message always names the offending file or folder.
    """
