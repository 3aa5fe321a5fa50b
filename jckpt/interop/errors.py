"""Errors raised by jckpt.interop.

TODO(lead): move UnsupportedSourceError into jckpt/errors.py (which owns every
exception) and export it from jckpt/__init__.py; this module then re-exports it.
"""


class UnsupportedSourceError(ValueError):
    """``import_from`` cannot read a source; the message says what it found there."""
