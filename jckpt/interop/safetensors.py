"""safetensors files and Hugging Face model directories, written and read in a streaming way.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian
header length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets"},
"__metadata__": {str: str}}`` padded with spaces, then the tensors' raw
little-endian bytes, back to back.  jckpt writes that layout itself instead of
calling ``safetensors.numpy.save_file``, which needs every tensor in memory at
once: the header is computed from shapes and dtypes first, then each tensor's
bytes are appended as its leaf is restored.  Reading memory-maps the file.

Data types safetensors has no name for (int4, uint4, int2, uint2,
float4_e2m1fn, float6_*, float8_e4m3, float8_e3m4, float8_e4m3b11fnuz,
complex128) are stored as their raw bits in the unsigned integer of the same
width (``U8`` for the sub-byte types, which ml_dtypes keeps one per byte;
``U64`` with a trailing axis of 2 for complex128), and the header's
``__metadata__["jckpt.dtypes"]`` (JSON ``{name: dtype}``) records the real
dtype, so that ``import_from`` gives them back bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from jckpt import progress as _progress
from jckpt.errors import UnsupportedSourceError
from jckpt.interop import _dtypes
from jckpt.interop._files import atomic_directory

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES_KEY = "jckpt.dtypes"
MAX_HEADER_BYTES = 100 * 2**20  # the limit of the reference implementation

_CODES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float8_e8m0fnu": "F8_E8M0",
}
_DTYPES = {code: name for name, code in _CODES.items()}
_PACKED_CODES = {"F4", "F6_E2M3", "F6_E3M2"}  # several values per byte: not read by jckpt

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10**9 each), ``"100KiB"`` (1024 each).

    Units follow Hugging Face's ``max_shard_size``: KB, MB, GB, TB are decimal
    and KiB, MiB, GiB, TiB binary; case does not matter.

    Raises:
      ValueError: not a positive size.
    """
    if isinstance(size, bool):
        raise ValueError(f"not a size: {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"not a size: {size!r} (examples: 1000000, '100KB', '5GB', '2GiB')")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


class Entry(NamedTuple):
    """One tensor to write: its name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _stored(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], bool]:
    """(safetensors dtype code, stored shape, raw?) of a tensor."""
    if dtype.name in _CODES:
        return _CODES[dtype.name], shape, False
    if dtype.itemsize <= 8:
        return _CODES[_dtypes.raw_view(dtype).name], shape, True
    return "U64", (*shape, dtype.itemsize // 8), True


def _nbytes(entry: Entry) -> int:
    return entry.dtype.itemsize * int(np.prod(entry.shape))


def shard_plan(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Splits tensors, in order, into shards of at most ``max_shard_size`` bytes of data each.

    A tensor larger than the limit gets a shard of its own (as in Hugging Face's sharding).
    """
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def header_bytes(entries: Sequence[Entry]) -> bytes:
    """The length prefix and JSON header of a file holding ``entries`` in that order."""
    header: dict = {}
    raw: dict[str, str] = {}
    offset = 0
    for entry in entries:
        code, shape, is_raw = _stored(entry.dtype, entry.shape)
        if is_raw:
            raw[entry.name] = entry.dtype.name
        end = offset + _nbytes(entry)
        header[entry.name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    if raw:
        header["__metadata__"] = {DTYPES_KEY: json.dumps(raw, sort_keys=True)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


def shard_names(count: int) -> list[str]:
    """``["model.safetensors"]``, or ``model-00001-of-0000N.safetensors`` for ``count`` > 1."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write(
    destination: str | os.PathLike,
    entries: Sequence[Entry],
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_size: int | str = "5GB",
    progress: _progress.Progress | None = None,
) -> list[str]:
    """Writes a Hugging Face layout directory, one tensor at a time.

    Args:
      destination: the directory to create (it must not exist, or be empty).
      entries: every tensor, in the order ``arrays`` yields them.
      arrays: ``(name, array)`` pairs matching ``entries``; each array is written
        and dropped before the next is taken.
      max_shard_size: above it (bytes of tensor data, int or e.g. ``"5GB"``) the
        tensors are split into ``model-0000i-of-0000N.safetensors`` files plus
        ``model.safetensors.index.json``.
      progress: advanced by each tensor's bytes.

    Returns:
      The paths of the files written.

    Raises:
      FileExistsError: ``destination`` exists and is not an empty directory.
      ValueError: a bad ``max_shard_size``, or ``arrays`` does not match ``entries``.
    """
    shards = shard_plan(entries, parse_size(max_shard_size))
    names = shard_names(len(shards))
    progress = progress or _progress._Silent()
    source = iter(arrays)
    with atomic_directory(destination) as tmp:
        for shard, file_name in zip(shards, names):
            with open(os.path.join(tmp, file_name), "wb") as f:
                f.write(header_bytes(shard))
                for entry in shard:
                    name, array = next(source)
                    _check(entry, name, array)
                    data = _dtypes.little_endian(array).reshape(-1).view(np.uint8)
                    f.write(memoryview(data))
                    progress.advance(data.nbytes)
                    del array, data
                f.flush()
                os.fsync(f.fileno())
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(e) for e in entries)},
                "weight_map": {e.name: file_name for shard, file_name in zip(shards, names) for e in shard},
            }
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
        written = names + ([INDEX_FILE] if len(shards) > 1 else [])
    return [os.path.join(os.fspath(destination), name) for name in written]


def _check(entry: Entry, name: str, array: np.ndarray) -> None:
    if name != entry.name or tuple(array.shape) != tuple(entry.shape) or array.dtype != entry.dtype:
        raise ValueError(
            f"expected {entry.name!r} {entry.dtype}{list(entry.shape)}, "
            f"got {name!r} {array.dtype}{list(array.shape)}"
        )


# -- reading -------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts.

    Raises:
      UnsupportedSourceError: the file is not a valid safetensors file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UnsupportedSourceError(f"{os.fspath(path)!r} is not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise UnsupportedSourceError(
                f"{os.fspath(path)!r} is not a safetensors file (header length {length}, file size {size})"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise UnsupportedSourceError(f"{os.fspath(path)!r}: safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise UnsupportedSourceError(f"{os.fspath(path)!r}: safetensors header is not a JSON object")
    return header, 8 + length


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """True when ``path`` starts with a plausible safetensors header (length prefix then ``{``)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    if len(prefix) < 9:
        return False
    (length,) = struct.unpack("<Q", prefix[:8])
    return prefix[8:9] == b"{" and length <= min(MAX_HEADER_BYTES, size - 8)


def read_file(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """The tensors of one safetensors file as read-only arrays memory-mapped from it.

    Nothing is read until the arrays are used; their pages belong to the page
    cache, which the kernel can drop, so host memory is not charged the file's size.

    Raises:
      UnsupportedSourceError: not a valid safetensors file, or a dtype jckpt cannot read.
    """
    header, start = read_header(path)
    where = os.fspath(path)
    try:
        raw = json.loads((header.pop("__metadata__", None) or {}).get(DTYPES_KEY, "{}"))
    except (ValueError, AttributeError) as e:
        raise UnsupportedSourceError(f"{where!r}: bad __metadata__[{DTYPES_KEY!r}]: {e}") from e
    size = os.path.getsize(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size > start else np.empty(0, np.uint8)
    out = []
    for name, info in header.items():
        try:
            code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise UnsupportedSourceError(f"{where!r}: bad header entry for {name!r}: {info!r}") from e
        if code in _PACKED_CODES or code not in _DTYPES:
            raise UnsupportedSourceError(
                f"{where!r}: tensor {name!r} has dtype {code}, which jckpt cannot read"
            )
        dtype = _dtypes.by_name(_DTYPES[code])
        if not 0 <= begin <= end <= size - start or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise UnsupportedSourceError(
                f"{where!r}: tensor {name!r} ({code}{list(shape)}) has data_offsets {[begin, end]}, which do "
                f"not fit its size or the file's {size - start} data bytes"
            )
        array = mapped[start + begin : start + end].view(dtype).reshape(shape)
        if name in raw:
            real = _dtypes.by_name(raw[name])
            array = array.view(real)
            if real.itemsize > dtype.itemsize:  # e.g. complex128 stored as U64 pairs
                array = array.reshape(shape[:-1])
        out.append((name, array))
    return out


def files_of(directory: str | os.PathLike) -> list[str] | None:
    """The safetensors files of a model directory, or None when it holds none.

    Uses ``*.safetensors.index.json`` when there is exactly one; otherwise the
    directory must hold exactly one ``*.safetensors`` file.

    Raises:
      UnsupportedSourceError: several candidates, or an index naming missing files.
    """
    directory = os.fspath(directory)
    names = sorted(os.listdir(directory))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) > 1:
        raise UnsupportedSourceError(
            f"{directory!r} holds several safetensors indexes ({', '.join(indexes)}): pass one of them"
        )
    if indexes:
        index_path = os.path.join(directory, indexes[0])
        return _files_of_index(index_path, weight_map(index_path))
    if len(files) > 1:
        raise UnsupportedSourceError(
            f"{directory!r} holds several safetensors files ({', '.join(files)}) and no index: pass one file"
        )
    return [os.path.join(directory, files[0])] if files else None


def weight_map(index_path: str) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a ``*.safetensors.index.json``.

    Raises:
      UnsupportedSourceError: not JSON, or no ``weight_map`` object of strings.
    """
    try:
        with open(index_path) as f:
            mapping = json.load(f)["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise TypeError("weight_map must map tensor names to file names")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnsupportedSourceError(f"{index_path!r} is not a safetensors index: {e!r}") from e
    return mapping


def _files_of_index(index_path: str, weight_map: dict) -> list[str]:
    directory = os.path.dirname(index_path)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise UnsupportedSourceError(f"{index_path!r} names files that do not exist: {', '.join(missing)}")
    return [os.path.join(directory, f) for f in files]


def read(source: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """Every tensor of a ``.safetensors`` file, an index file, or a model directory (memory-mapped).

    Raises:
      UnsupportedSourceError: no safetensors there, invalid files, a name in two
        files, or an index whose tensors are missing.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        files = files_of(source)
        if files is None:
            raise UnsupportedSourceError(f"{source!r} holds no .safetensors files")
        index = next((n for n in os.listdir(source) if n.endswith(".safetensors.index.json")), None)
        index_path = os.path.join(source, index) if index else None
    elif source.endswith(".safetensors.index.json"):
        index_path = source
        files = _files_of_index(source, weight_map(source))
    else:
        files, index_path = [source], None
    tensors: list[tuple[str, np.ndarray]] = []
    where: dict[str, str] = {}
    for path in files:
        for name, array in read_file(path):
            if name in where:
                raise UnsupportedSourceError(f"tensor {name!r} is in both {where[name]!r} and {path!r}")
            where[name] = path
            tensors.append((name, array))
    if index_path is not None:
        missing = sorted(set(weight_map(index_path)) - set(where))
        if missing:
            raise UnsupportedSourceError(
                f"{index_path!r} maps {len(missing)} tensor(s) missing from their files: {missing[:5]}"
            )
    return tensors
