"""Export jckpt steps to safetensors, npz and Orbax; import them back (see docs/deploying.md).

``export`` and ``import_from`` are also ``jckpt.export`` and ``jckpt.import_from``.
"""
# ruff: noqa: I001  (the public API: one name per line)

from jckpt.interop.api import ExportInfo
from jckpt.interop.api import detect_format
from jckpt.interop.api import export
from jckpt.interop.api import import_from
from jckpt.errors import UnsupportedSourceError

__all__ = (
    "ExportInfo",
    "UnsupportedSourceError",
    "detect_format",
    "export",
    "import_from",
)
