"""A GGUF file's header: metadata scalars, array lengths, tensor infos, and whether the data is all there.

Why not ``gguf.GGUFReader``: it turns every array element into Python objects, 4.8 s
for SmolLM2's header alone (49k tokens and 48.9k merges), and quantforge reads headers
often (planning, every GGUF stage, every eval session). This scan reads the same bytes
by the GGUF specification (ggml/docs/gguf.md) and skips array bodies, in about 0.1 s.
Only block sizes come from the gguf library (``GGML_QUANT_SIZES``), so new tensor types
are known as soon as the library knows them. Full arrays (a tokenizer's tokens and
merges) are still read with ``GGUFReader`` where they are needed.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value types: fixed-size scalars (format, size), string, array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
STRING, ARRAY = 8, 9


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class Header:
    version: int
    metadata: dict = field(default_factory=dict)  # scalars and strings; arrays as {"type": elem_type, "length": n}
    tensors: list[TensorInfo] = field(default_factory=list)
    data_start: int = 0
    file_size: int = 0

    def truncated(self) -> TensorInfo | None:
        """The first tensor whose data ends past the end of the file, if any."""
        return next((t for t in self.tensors if t.offset + t.n_bytes > self.file_size), None)


def read_header(path: Path) -> Header:
    """Parse a GGUF header; HeaderError for what is not a complete, readable GGUF."""
    path = Path(path)
    st = path.stat()
    return _read(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _read(path: str, size: int, mtime_ns: int) -> Header:
    import gguf

    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise HeaderError(f"not a GGUF file (it starts with {head!r}, not b'GGUF')")
    if size < 24:
        raise HeaderError("too short to hold a GGUF header: truncated")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        pos = 4

        def take(fmt: str, n: int):
            nonlocal pos
            if pos + n > size:
                raise HeaderError("the header ends before the file does: truncated")
            v = struct.unpack_from(fmt, m, pos)[0]
            pos += n
            return v

        def string() -> str:
            nonlocal pos
            n = take("<Q", 8)
            if pos + n > size:
                raise HeaderError("the header ends before the file does: truncated")
            s = bytes(m[pos:pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def skip_array(elem: int, count: int) -> None:
            nonlocal pos
            if elem in _SCALARS:
                pos += _SCALARS[elem][1] * count
            elif elem == STRING:
                for _ in range(count):
                    pos += 8 + struct.unpack_from("<Q", m, pos)[0]
            elif elem == ARRAY:
                for _ in range(count):
                    skip_array(take("<I", 4), take("<Q", 8))
            else:
                raise HeaderError(f"unknown array element type {elem}")
            if pos > size:
                raise HeaderError("the header ends before the file does: truncated")

        version = take("<I", 4)
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not one this reader knows (2 or 3)")
        n_tensors, n_kv = take("<Q", 8), take("<Q", 8)
        header = Header(version=version, file_size=size)
        for _ in range(n_kv):
            key = string()
            vtype = take("<I", 4)
            if vtype in _SCALARS:
                header.metadata[key] = take(*_SCALARS[vtype])
            elif vtype == STRING:
                header.metadata[key] = string()
            elif vtype == ARRAY:
                elem, count = take("<I", 4), take("<Q", 8)
                skip_array(elem, count)
                header.metadata[key] = {"type": elem, "length": count}
            else:
                raise HeaderError(f"unknown value type {vtype} for key {key!r}")
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I", 4)
            shape = tuple(take("<Q", 8) for _ in range(n_dims))
            type_id, offset = take("<I", 4), take("<Q", 8)
            infos.append((name, shape, type_id, offset))
        align = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        header.data_start = (pos + align - 1) // align * align
        for name, shape, type_id, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise HeaderError(f"tensor {name!r} has a type ({type_id}) this gguf library does not know") from None
            elements = 1
            for d in shape:
                elements *= d
            header.tensors.append(TensorInfo(name, shape, type_id, qtype.name, header.data_start + offset,
                                             elements // block * type_size))
    return header


def file_type_name(metadata: dict) -> str | None:
    """general.file_type as llama.cpp's name (Q4_K_M, F16, ...)."""
    import gguf

    ftype = metadata.get("general.file_type")
    if ftype is None:
        return None
    try:
        return gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return str(ftype)
