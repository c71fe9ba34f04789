"""The blob format: the weight files that hold a MIL program's BLOBFILE constants.

A program refers to each constant as ``BLOBFILE(path="@model_path/weights/...",
offset=uint64(64))``; the file is a 128-byte header followed by one fp16 tensor. ``build_blob``
writes it (``anecy.mil``), ``read_blob`` reads it back with every header field checked
(``anecy.milsim``, ``anecy.coreml_check``).
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["BLOB_HEADER_BYTES", "BLOB_DESCRIPTOR_OFFSET", "build_blob", "read_blob"]

BLOB_HEADER_BYTES = 128
BLOB_DESCRIPTOR_OFFSET = 64   # the value written in BLOBFILE(..., offset=uint64(64))
_BLOB_MAGIC = b"\xef\xbe\xad\xde"


def build_blob(values) -> bytes:
    """A weight file holding one fp16 tensor: 128-byte header then the fp16 payload.

    Header: byte 0 = 1, byte 4 = 2 (file header); at 64 the chunk descriptor the BLOBFILE
    offset points to: magic DEADBEEF (little-endian), byte 68 = 1, uint32 at 72 = payload
    bytes, uint32 at 80 = payload offset (128)."""
    payload = np.ascontiguousarray(np.asarray(values).astype("<f2").ravel()).tobytes()
    head = bytearray(BLOB_HEADER_BYTES)
    head[0] = 1
    head[4] = 2
    head[64:68] = _BLOB_MAGIC
    head[68] = 1
    struct.pack_into("<I", head, 72, len(payload))
    struct.pack_into("<I", head, 80, BLOB_HEADER_BYTES)
    return bytes(head) + payload


def read_blob(data: bytes, offset: int = BLOB_DESCRIPTOR_OFFSET) -> np.ndarray:
    """The fp16 payload of a blob written by ``build_blob`` (flat), after checking its
    header; raises ValueError saying what is wrong."""
    data = bytes(data)
    if len(data) < BLOB_HEADER_BYTES:
        raise ValueError(f"blob of {len(data)} bytes is shorter than its 128-byte header")
    if data[0] != 1 or data[4] != 2:
        raise ValueError("blob file header is not 1 at byte 0 and 2 at byte 4")
    if offset < 0 or offset + 24 > len(data):
        raise ValueError(f"blob descriptor offset {offset} is outside the blob")
    if data[offset:offset + 4] != _BLOB_MAGIC:
        raise ValueError(f"blob has no DEADBEEF descriptor at offset {offset}")
    if data[offset + 4] != 1:
        raise ValueError("blob descriptor's data type byte is not 1 (fp16)")
    nbytes, = struct.unpack_from("<I", data, offset + 8)
    start, = struct.unpack_from("<I", data, offset + 16)
    if nbytes % 2:
        raise ValueError(f"blob payload of {nbytes} bytes is not whole fp16 values")
    if start < BLOB_HEADER_BYTES or start + nbytes != len(data):
        raise ValueError(f"blob declares {nbytes} payload bytes at {start} but holds "
                         f"{len(data)} bytes in all")
    return np.frombuffer(data, dtype="<f2", count=nbytes // 2, offset=start).astype(np.float16)
