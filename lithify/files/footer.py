"""Parquet footer surgery: decode a footer, move row groups, encode a new footer.

A Parquet footer is a Thrift (compact protocol) `FileMetaData`. It is decoded here into a generic
tree (a struct is a list of [field id, type, value]) so that fields this code does not know
survive unchanged: only absolute file offsets are shifted and the row-group list, row count and
key-value metadata replaced. This is what lets several writers encode row groups of ONE file in
parallel (see `lithify.files.partitioned_writer`): pyarrow can write a footer but cannot adopt row
groups written elsewhere.
"""

from __future__ import annotations

import struct
from typing import Any

_T_TRUE, _T_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64 = 1, 2, 3, 4, 5, 6
_T_DOUBLE, _T_BINARY, _T_LIST, _T_SET, _T_MAP, _T_STRUCT = 7, 8, 9, 10, 11, 12

# FileMetaData 3 num_rows, 4 row_groups, 5 key_value_metadata; RowGroup 1 columns, 5 file_offset,
# 7 ordinal; ColumnChunk 2 file_offset, 3 meta_data, 4 offset_index_offset, 6 column_index_offset;
# ColumnMetaData 9 data_page_offset, 10 index_page_offset, 11 dictionary_page_offset,
# 14 bloom_filter_offset.
_CHUNK_OFFSETS = (2, 4, 6)
_META_OFFSETS = (9, 10, 11, 14)


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = result = 0
        for _ in range(10):
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
        raise ValueError("bad varint in Parquet footer")

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, t: int) -> Any:
        if t in (_T_TRUE, _T_FALSE):
            return self.byte() == 1
        if t == _T_BYTE:
            return self.byte()
        if t in (_T_I16, _T_I32, _T_I64):
            return self.zigzag()
        if t == _T_DOUBLE:
            v = self.buf[self.pos : self.pos + 8]
            self.pos += 8
            return v
        if t == _T_BINARY:
            n = self.varint()
            v = self.buf[self.pos : self.pos + n]
            self.pos += n
            return v
        if t in (_T_LIST, _T_SET):
            h = self.byte()
            n, et = h >> 4, h & 0x0F
            if n == 15:
                n = self.varint()
            return [et, [self.value(et) for _ in range(n)]]
        if t == _T_MAP:
            n = self.varint()
            kv = self.byte() if n else 0
            kt, vt = kv >> 4, kv & 0x0F
            return [kt, vt, [(self.value(kt), self.value(vt)) for _ in range(n)]]
        if t == _T_STRUCT:
            return self.struct()
        raise ValueError(f"unknown Thrift type {t} in Parquet footer")

    def struct(self) -> list[list[Any]]:
        fields: list[list[Any]] = []
        last = 0
        while True:
            h = self.byte()
            if h == 0:
                return fields
            t, delta = h & 0x0F, h >> 4
            fid = last + delta if delta else self.zigzag()
            if t in (_T_TRUE, _T_FALSE):
                fields.append([fid, _T_TRUE, t == _T_TRUE])
            else:
                fields.append([fid, t, self.value(t)])
            last = fid


def _thrift_decode_struct(buf: bytes) -> list[list[Any]]:
    return _Reader(buf).struct()


def _w_varint(out: bytearray, v: int) -> None:
    while v > 0x7F:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _w_zigzag(out: bytearray, v: int) -> None:
    _w_varint(out, (v << 1) ^ (v >> 63))


def _w_value(out: bytearray, t: int, v: Any) -> None:
    if t in (_T_TRUE, _T_FALSE):
        out.append(1 if v else 2)
    elif t == _T_BYTE:
        out.append(v & 0xFF)
    elif t in (_T_I16, _T_I32, _T_I64):
        _w_zigzag(out, v)
    elif t == _T_DOUBLE:
        out += v
    elif t == _T_BINARY:
        _w_varint(out, len(v))
        out += v
    elif t in (_T_LIST, _T_SET):
        et, items = v
        if len(items) < 15:
            out.append((len(items) << 4) | et)
        else:
            out.append(0xF0 | et)
            _w_varint(out, len(items))
        for item in items:
            _w_value(out, et, item)
    elif t == _T_MAP:
        kt, vt, items = v
        _w_varint(out, len(items))
        if items:
            out.append((kt << 4) | vt)
        for k, val in items:
            _w_value(out, kt, k)
            _w_value(out, vt, val)
    elif t == _T_STRUCT:
        _w_struct(out, v)
    else:
        raise ValueError(f"unknown Thrift type {t}")


def _w_struct(out: bytearray, fields: list[list[Any]]) -> None:
    last = 0
    for fid, t, v in fields:
        wire_t = (_T_TRUE if v else _T_FALSE) if t == _T_TRUE else t
        if 0 < fid - last <= 15:
            out.append(((fid - last) << 4) | wire_t)
        else:
            out.append(wire_t)
            _w_zigzag(out, fid)
        if t != _T_TRUE:
            _w_value(out, t, v)
        last = fid
    out.append(0)


def _thrift_encode_struct(fields: list[list[Any]]) -> bytes:
    out = bytearray()
    _w_struct(out, fields)
    return bytes(out)


MAGIC = b"PAR1"


def _field(fields: list[list[Any]], fid: int) -> list[Any] | None:
    for f in fields:
        if f[0] == fid:
            return f
    return None


def split_file(data: memoryview) -> tuple[int, list[list[Any]]]:
    """(where the footer starts, the decoded footer) of a whole Parquet file held in memory."""
    n = len(data)
    if n < 12 or bytes(data[:4]) != MAGIC or bytes(data[n - 4 :]) != MAGIC:
        raise ValueError("not a Parquet file")
    (flen,) = struct.unpack("<I", data[n - 8 : n - 4])
    start = n - 8 - flen
    if start < 4:
        raise ValueError("Parquet footer length out of range")
    return start, _thrift_decode_struct(bytes(data[start : n - 8]))


def row_groups(footer: list[list[Any]]) -> list[list[list[Any]]]:
    """The row groups (decoded structs) a footer lists, in its order."""
    rgs = _field(footer, 4)
    return list(rgs[2][1]) if rgs else []


def move_row_group(rg: list[list[Any]], delta: int) -> None:
    """Shift every absolute file offset of row group `rg` by `delta` bytes (in place)."""
    for f in rg:
        if f[0] == 5:
            f[2] += delta
        elif f[0] == 1:
            for chunk in f[2][1]:
                for cf in chunk:
                    if cf[0] == 2 and cf[2] == 0:
                        continue  # file_offset 0: no column metadata outside the footer
                    if cf[0] in _CHUNK_OFFSETS and cf[1] == _T_I64:
                        cf[2] += delta
                    elif cf[0] == 3:
                        for mf in cf[2]:
                            if mf[0] in _META_OFFSETS and mf[1] == _T_I64:
                                mf[2] += delta


def file_tail(
    base: list[list[Any]], groups: list[list[list[Any]]], kv: dict[bytes, bytes]
) -> bytes:
    """The end of a Parquet file (footer, its length, magic) listing `groups` in this order.

    `base` is the footer of a file written with the same schema and options: its schema, version,
    writer and column orders are kept, and its stored Arrow schema (in the key-value metadata, so
    that types round-trip); rows, row groups (ordinals renumbered) and the rest of the key-value
    metadata are replaced.
    """
    rows = 0
    for ordinal, rg in enumerate(groups):
        nrows = _field(rg, 3)
        rows += nrows[2] if nrows else 0
        for f in rg:
            if f[0] == 7:
                f[2] = ordinal
    kv_list = [_T_STRUCT, [[[1, _T_BINARY, k], [2, _T_BINARY, v]] for k, v in kv.items()]]
    old_kv = _field(base, 5)
    if old_kv:
        for item in old_kv[2][1]:
            key = _field(item, 1)
            if key and key[2] == b"ARROW:schema":
                kv_list[1].append(item)
    merged = [f for f in base if f[0] not in (3, 4, 5)] + [
        [3, _T_I64, rows],
        [4, _T_LIST, [_T_STRUCT, groups]],
        [5, _T_LIST, kv_list],
    ]
    merged.sort(key=lambda f: f[0])
    blob = _thrift_encode_struct(merged)
    return blob + struct.pack("<I", len(blob)) + MAGIC


__all__ = ["MAGIC", "file_tail", "move_row_group", "row_groups", "split_file"]
