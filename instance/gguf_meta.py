"""The key/value metadata of a GGUF file, as plain Python values.

    meta = read_gguf_metadata("model.gguf")
    meta["general.architecture"]        # 'llama'
    meta["tokenizer.ggml.tokens"][:3]   # ['<|endoftext|>', '<|im_start|>', '<|im_end|>']

Given a path, only the metadata section at the head of the file is parsed; tensor infos and tensor data
are never touched. That takes tens of milliseconds where `gguf.GGUFReader` spends seconds building a numpy
view per array element, so the tokenizer reads files this way. A `GGUFReader` that the weight loader has
already opened is accepted too and gives the same dict.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

# GGUF value type codes, from the GGUF specification.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(8, 13)

_SCALAR_FORMATS = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
    _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}
_NUMPY_TYPES = {
    _UINT8: "u1", _INT8: "i1", _UINT16: "u2", _INT16: "i2", _UINT32: "u4", _INT32: "i4",
    _FLOAT32: "f4", _BOOL: "?", _UINT64: "u8", _INT64: "i8", _FLOAT64: "f8",
}


def read_gguf_metadata(source: str | os.PathLike | object) -> dict[str, object]:
    """Every metadata key of a GGUF file (a path, or an open `gguf.GGUFReader`) mapped to its value.

    Strings become `str`, numbers `int`/`float`/`bool`, arrays `list`s of those. The reader's own
    pseudo-keys ("GGUF.version", ...) are left out, so both kinds of source give the same dict.
    """
    if isinstance(source, (str, os.PathLike)):
        return _read_file(Path(source))
    fields = getattr(source, "fields", None)
    if fields is None:
        raise TypeError(f"read_gguf_metadata takes a path or a gguf.GGUFReader, not {type(source).__name__}")
    return {name: field.contents() for name, field in fields.items() if not name.startswith("GGUF.")}


def _read_file(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24 or f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _MetadataParser(buf, path).parse()


class _MetadataParser:
    """Walks the header: magic, version, tensor count, kv count, then the key/value pairs."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf = buf
        self.path = path
        self.pos = 4
        (version,) = struct.unpack_from("<I", buf, 4)
        # A big-endian file shows its small version number byte-swapped when read little-endian.
        self.order = "<" if version & 0xFFFF else ">"

    def parse(self) -> dict[str, object]:
        version = self._scalar(_UINT32)
        if version < 2:
            raise ValueError(f"{self.path} is GGUF version {version}; re-convert it with a current llama.cpp")
        self._scalar(_UINT64)  # tensor count
        kv_count = self._scalar(_UINT64)
        meta: dict[str, object] = {}
        for _ in range(kv_count):
            key = self._string()
            meta[key] = self._value(self._scalar(_UINT32))
        return meta

    def _scalar(self, value_type: int):
        fmt = self.order + _SCALAR_FORMATS[value_type]
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._scalar(_UINT64)
        text = self.buf[self.pos : self.pos + length].decode("utf-8", errors="replace")
        self.pos += length
        return text

    def _value(self, value_type: int):
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            item_type = self._scalar(_UINT32)
            count = self._scalar(_UINT64)
            if item_type in _NUMPY_TYPES:
                dtype = np.dtype(_NUMPY_TYPES[item_type]).newbyteorder(self.order)
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += items.nbytes
                return items.tolist()
            return [self._value(item_type) for _ in range(count)]
        if value_type in _SCALAR_FORMATS:
            return self._scalar(value_type)
        raise ValueError(f"{self.path} has metadata of unknown GGUF type {value_type}; the file may be corrupt")
