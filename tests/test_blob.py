"""The blob format (anecy.blob): the writer byte for byte against the format written out
by hand, and the reader's round trip and its refusals."""

import struct

import numpy as np
import pytest

from anecy.blob import build_blob, read_blob

# ------------------------------------------------------------------------------------------
# blobs
# ------------------------------------------------------------------------------------------

def expected_blob(values_f16):
    payload = np.asarray(values_f16, dtype="<f2").tobytes()
    header = (bytes([1, 0, 0, 0, 2]) + bytes(59)                       # bytes 0..63
              + bytes([0xEF, 0xBE, 0xAD, 0xDE, 1, 0, 0, 0])            # 64..71
              + struct.pack("<I", len(payload)) + bytes(4)             # 72..79
              + struct.pack("<I", 128) + bytes(44))                    # 80..127
    assert len(header) == 128
    return header + payload


def test_blob_writer_byte_for_byte():
    vals = np.array([[0.0, 1.0, -2.5], [65504.0, -0.0, 1e-7]], dtype=np.float32)
    got = build_blob(vals)
    assert got == expected_blob(vals.astype(np.float16).ravel())
    assert len(got) == 128 + 12
    assert got[72:76] == b"\x0c\x00\x00\x00" and got[80:84] == b"\x80\x00\x00\x00"
    # payload is little-endian IEEE half: 1.0 = 0x3C00, -2.5 = 0xC100
    assert got[130:132] == b"\x00\x3c" and got[132:134] == b"\x00\xc1"


def test_blob_reader_round_trip_and_rejections():
    vals = np.arange(-8, 8, dtype=np.float16) / 4
    blob = build_blob(vals)
    assert np.array_equal(read_blob(blob), vals)
    bad = [blob[:100], b"\x00" + blob[1:], blob[:64] + b"\x00" + blob[65:],
           blob[:68] + b"\x02" + blob[69:], blob + b"\x00\x00", blob[:-2]]
    for b in bad:
        with pytest.raises(ValueError):
            read_blob(b)
