"""Export jckpt steps to safetensors, npz and Orbax; import them back (see docs/deploying.md).

TODO(lead): expose ``export`` and ``import_from`` as ``jckpt.export`` /
``jckpt.import_from`` (and UnsupportedSourceError as ``jckpt.UnsupportedSourceError``).
"""
# ruff: noqa: I001  (the public API: one name per line)

from jckpt.interop.api import ExportInfo
from jckpt.interop.api import detect_format
from jckpt.interop.api import export
from jckpt.interop.api import import_from
from jckpt.interop.errors import UnsupportedSourceError

__all__ = (
    "ExportInfo",
    "UnsupportedSourceError",
    "detect_format",
    "export",
    "import_from",
)
