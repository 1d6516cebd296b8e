"""A small TFRecord reader with checksum verification, and a `tf.train.Example` parser.

TensorFlow is not needed. A TFRecord file is a sequence of records, each framed as

    uint64 length (little endian) | uint32 masked crc32c(length bytes) | data | uint32 masked crc32c(data)

where masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32) and crc32c is the
Castagnoli CRC (reflected polynomial 0x82F63B78). `read_records` verifies both checksums of
every record and raises `DataError` naming the file, the record and the byte offset when the
framing or a checksum is wrong, or the file ends inside a record.

A `tf.train.Example` is a protobuf message; `parse_example` decodes it with a minimal
wire-format reader (Example.features = 1 -> Features.feature = 1, a map string -> Feature;
Feature is one of bytes_list = 1, float_list = 2, int64_list = 3, each `repeated value = 1`,
packed or not). Values come back as a dict name -> list of bytes / float / int.

The crc32c is table-driven pure Python (about 10 MB/s); when the optional `crc32c` or
`google-crc32c` package is installed its C implementation is used instead (same results).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Iterator

from bench.errors import DataError

_MASK_DELTA = 0xA282EAD8
_HEADER = 12  # uint64 length + uint32 masked crc of the length
_FOOTER = 4  # uint32 masked crc of the data


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_python(data: bytes, crc: int = 0) -> int:
    """crc32c of `data` (continuing from `crc`), in pure Python."""
    table = _TABLE
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _fast_crc32c() -> Callable[[bytes], int] | None:
    try:
        import crc32c as _c  # type: ignore[import-not-found]

        return lambda data: _c.crc32c(data)
    except ImportError:
        pass
    try:
        import google_crc32c as _g  # type: ignore[import-not-found]

        return lambda data: _g.value(bytes(data))
    except ImportError:
        return None


_FAST = _fast_crc32c()


def crc32c(data: bytes) -> int:
    """crc32c (Castagnoli) of `data`: the C package when installed, else pure Python."""
    return _FAST(data) if _FAST is not None else crc32c_python(data)


def masked_crc(data: bytes) -> int:
    """The TFRecord checksum of `data`: crc32c rotated right by 15 bits plus 0xa282ead8."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record framed as TFRecord (for writing test fixtures)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


def write_records(path: Path, records: list[bytes]) -> None:
    """Write `records` as a TFRecord file (uncompressed)."""
    Path(path).write_bytes(b"".join(frame(r) for r in records))


def read_records(path: Path | str, verify: bool = True) -> Iterator[bytes]:
    """The records of the TFRecord file `path`, each checked against both of its checksums.

    Raises DataError (file, record number, byte offset) on a truncated file or a bad checksum.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    pos, i, n = 0, 0, len(data)
    mv = memoryview(data)
    while pos < n:
        if pos + _HEADER > n:
            raise DataError(f"{path}: truncated record header of record {i} at byte {pos} "
                            f"({n - pos} bytes left, need {_HEADER})")
        length_bytes = mv[pos:pos + 8]
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if verify and masked_crc(length_bytes) != length_crc:
            raise DataError(f"{path}: corrupt record {i} at byte {pos}: the checksum of its length field is wrong "
                            f"(not a TFRecord file, or damaged)")
        start = pos + _HEADER
        end = start + length
        if end + _FOOTER > n:
            raise DataError(f"{path}: truncated record {i} at byte {pos}: needs {length} data bytes and a "
                            f"checksum, the file has {n - start} bytes left")
        body = mv[start:end]
        (data_crc,) = struct.unpack_from("<I", data, end)
        if verify and masked_crc(body) != data_crc:
            raise DataError(f"{path}: corrupt record {i} at byte {pos}: data checksum mismatch")
        yield bytes(body)
        pos = end + _FOOTER
        i += 1


# ---------------------------------------------------------------------------------------------
# protobuf wire format: just enough for tf.train.Example
# ---------------------------------------------------------------------------------------------

class _ProtoError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise _ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise _ProtoError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a message; value is int (varint / fixed) or bytes."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > n:
                raise _ProtoError("truncated fixed64")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > n:
                raise _ProtoError("truncated length-delimited field")
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            if pos + 4 > n:
                raise _ProtoError("truncated fixed32")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        yield field, wire, value


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> list:
    out: list = []
    for kind, _, value in _fields(buf):
        if not isinstance(value, bytes):
            raise _ProtoError("Feature field is not a message")
        for field, wire, v in _fields(value):
            if field != 1:
                continue
            if kind == 1:  # BytesList
                out.append(bytes(v))  # type: ignore[arg-type]
            elif kind == 2:  # FloatList: packed (wire 2) or single fixed32 (wire 5)
                raw = v if isinstance(v, bytes) else b""
                out.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
            elif kind == 3:  # Int64List: packed (wire 2) or single varint (wire 0)
                if wire == 0:
                    out.append(_int64(v))  # type: ignore[arg-type]
                else:
                    p = 0
                    while p < len(v):  # type: ignore[arg-type]
                        x, p = _varint(v, p)  # type: ignore[arg-type]
                        out.append(_int64(x))
    return out


def parse_example(record: bytes, where: str = "record") -> dict[str, list]:
    """Features of a serialized `tf.train.Example`: name -> list of bytes, float or int."""
    try:
        features: dict[str, list] = {}
        for field, _, value in _fields(record):
            if field != 1 or not isinstance(value, bytes):
                continue
            for f2, _, entry in _fields(value):
                if f2 != 1 or not isinstance(entry, bytes):
                    continue
                key, feat = None, b""
                for f3, _, v in _fields(entry):
                    if f3 == 1 and isinstance(v, bytes):
                        key = v.decode("utf-8")
                    elif f3 == 2 and isinstance(v, bytes):
                        feat = v
                if key is None:
                    raise _ProtoError("feature map entry without a key")
                features[key] = _feature(feat)
        return features
    except (_ProtoError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not a valid tf.train.Example ({e})") from e


def encode_example(features: dict[str, list]) -> bytes:
    """Serialize a `tf.train.Example` (bytes, int or float lists) - for test fixtures."""

    def varint(v: int) -> bytes:
        v &= (1 << 64) - 1
        out = bytearray()
        while True:
            b = v & 0x7F
            v >>= 7
            if v:
                out.append(b | 0x80)
            else:
                out.append(b)
                return bytes(out)

    def ld(field: int, payload: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(payload)) + payload

    entries = b""
    for key, values in features.items():
        if values and isinstance(values[0], (bytes, bytearray)):
            kind = ld(1, b"".join(ld(1, bytes(v)) for v in values))
        elif values and isinstance(values[0], float):
            kind = ld(2, ld(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            kind = ld(3, ld(1, b"".join(varint(int(v)) for v in values)))
        entries += ld(1, ld(1, key.encode()) + ld(2, kind))
    return ld(1, entries)
