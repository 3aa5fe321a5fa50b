"""NumPy ``.npz`` archives, written and read one array at a time.

An export is an uncompressed zip of ``<name>.npy`` members, one per tensor,
named as in safetensors (``params.layers.0.kernel``), so ``np.load(path)[name]``
reads it; each array's data starts 64-byte aligned in the file.  Dtypes a
``.npy`` header cannot name (bfloat16, float8_*, int4, ... every ml_dtypes
type) are stored as their raw bits in the unsigned integer of the same width,
and the member ``__jckpt_dtypes__.npy`` (a 0-d string array holding JSON
``{name: dtype}``) records the real dtypes, so ``import_from`` gives them back
bit for bit.  ``np.load`` users can do the same with
``array.view(ml_dtypes.bfloat16)``.

Reading memory-maps uncompressed members in place (``np.savez`` and jckpt
exports); a compressed member (``np.savez_compressed``) is decompressed into
a file-backed spool array, in bounded pieces.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from collections.abc import Iterable

import numpy as np

from jckpt import progress as _progress
from jckpt.errors import UnsupportedSourceError
from jckpt.interop import _dtypes
from jckpt.interop._files import atomic_file
from jckpt.interop._spool import Spool

DTYPES_MEMBER = "__jckpt_dtypes__"
_READ_PIECE = 16 * 2**20
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header, 30 bytes
_ZIP64_EXTRA = 20  # the zip64 record zipfile adds to a local header written with force_zip64
_PADDING_ID = 0xD935  # the extra-field id zipalign uses for padding
ALIGNMENT = 64


def _aligned_member(zf: zipfile.ZipFile, filename: str) -> zipfile.ZipInfo:
    """A stored member whose data will start ``ALIGNMENT``-aligned in the file.

    The local header's extra field is padded (with a zipalign-style 0xD935
    record) so the member starts aligned; ``.npy`` headers are padded to 64
    bytes, so the array data is aligned too and maps in place without copies
    (tensorstore copies unaligned arrays before writing them).
    """
    info = zipfile.ZipInfo(filename, date_time=time.localtime()[:6])
    info.compress_type = zipfile.ZIP_STORED
    header = _LOCAL_HEADER.size + len(filename.encode("utf-8")) + _ZIP64_EXTRA
    pad = -(zf.fp.tell() + header) % ALIGNMENT
    if pad:
        pad += ALIGNMENT if pad < 4 else 0  # an extra-field record needs 4 bytes of its own
        info.extra = struct.pack("<HH", _PADDING_ID, pad - 4) + bytes(pad - 4)
    return info


def write(
    destination: str | os.PathLike,
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    progress: _progress.Progress | None = None,
) -> list[str]:
    """Writes an ``.npz`` file, one member per ``(name, array)``, each dropped once written.

    Args:
      destination: the file to create; it must not exist.
      arrays: the tensors, by name.
      progress: advanced by each tensor's bytes.

    Returns:
      ``[destination]``.

    Raises:
      FileExistsError: ``destination`` exists.
      ValueError: a tensor is named ``__jckpt_dtypes__`` or appears twice.
    """
    progress = progress or _progress._Silent()
    real: dict[str, str] = {}
    with atomic_file(destination) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            seen = set()
            for name, array in arrays:
                if name == DTYPES_MEMBER or name in seen:
                    raise ValueError(f"cannot write a second or reserved member named {name!r}")
                seen.add(name)
                if not _dtypes.is_numpy_native(array.dtype):
                    real[name] = array.dtype.name
                    array = np.asarray(array, order="C").view(_dtypes.raw_view(array.dtype))
                with zf.open(_aligned_member(zf, name + ".npy"), "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(array, order="C"), allow_pickle=False)
                progress.advance(array.nbytes)
                del array
            if real:
                with zf.open(DTYPES_MEMBER + ".npy", "w") as f:
                    np.lib.format.write_array(
                        f, np.array(json.dumps(real, sort_keys=True)), allow_pickle=False
                    )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return [os.path.abspath(os.fspath(destination))]


def looks_like_npz(path: str | os.PathLike) -> bool:
    """True when ``path`` is a zip archive holding at least one ``.npy`` member."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith(".npy") for name in zf.namelist())


def _header(f, where: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, npy format major version) of a .npy stream positioned at its start."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"npy format version {version} is not read by jckpt")
    except ValueError as e:
        raise UnsupportedSourceError(f"{where}: not a .npy array: {e}") from e
    if dtype.hasobject:
        raise UnsupportedSourceError(f"{where}: holds Python objects (pickled); only numeric arrays import")
    return tuple(shape), fortran, dtype, version[0]


def _mapped(path: str, zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray | None:
    """A stored (uncompressed), C-order member memory-mapped in place, or None when it cannot be."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != b"PK\x03\x04":
            raise UnsupportedSourceError(f"{where}: bad zip local header")
        name_len, extra_len = fields[-2], fields[-1]
        start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        f.seek(start)
        shape, fortran, dtype, _ = _header(f, where)
        offset = f.tell()
    nbytes = dtype.itemsize * int(np.prod(shape))
    if fortran or offset + nbytes > start + info.file_size:
        return None
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def _decompressed(zf: zipfile.ZipFile, info: zipfile.ZipInfo, spool: Spool, where: str) -> np.ndarray:
    """A member read through the zip stream into a spool array, ``_READ_PIECE`` bytes at a time."""
    with zf.open(info) as f:
        shape, fortran, dtype, _ = _header(f, where)
        raw = spool.empty(shape[::-1] if fortran else shape, dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        position = 0
        while position < len(view):
            piece = f.read(min(_READ_PIECE, len(view) - position))
            if not piece:
                raise UnsupportedSourceError(f"{where}: truncated ({position} of {len(view)} bytes)")
            view[position : position + len(piece)] = piece
            position += len(piece)
    if not fortran:
        return raw
    ordered = spool.empty(shape, dtype)  # jckpt saves C-order arrays
    ordered[...] = raw.T
    return ordered


def read(path: str | os.PathLike, spool: Spool) -> list[tuple[str, np.ndarray]]:
    """Every array of an ``.npz`` file, memory-mapped where stored uncompressed.

    Args:
      path: the ``.npz`` file.
      spool: receives members that cannot be mapped in place (compressed, Fortran order).

    Returns:
      ``(name, array)`` pairs, with dtypes recorded in ``__jckpt_dtypes__`` restored.

    Raises:
      UnsupportedSourceError: not a zip of ``.npy`` arrays, or an array of Python objects.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise UnsupportedSourceError(f"{path!r} is not an .npz (zip) file")
    out: list[tuple[str, np.ndarray]] = []
    real: dict[str, str] = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = info.filename[: -len(".npy")] if info.filename.endswith(".npy") else info.filename
            where = f"{path!r} member {info.filename!r}"
            if name == DTYPES_MEMBER:
                with zf.open(info) as f:
                    real = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
                continue
            array = _mapped(path, zf, info, where)
            out.append((name, array if array is not None else _decompressed(zf, info, spool, where)))
    restored = []
    for name, array in out:
        if name in real:
            array = array.view(_dtypes.by_name(real[name]))
        restored.append((name, array))
    return restored
