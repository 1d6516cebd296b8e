"""The TensorFlow-free TFRecord reader: crc32c, framing checks, tf.train.Example parsing."""

from __future__ import annotations

import struct

import pytest

from bench.errors import DataError
from bench.sources import tfrecord as tfr


def test_crc32c_known_values():
    # RFC 3720 / iSCSI check value, and the all-zero / all-0xff 32-byte vectors of RFC 3720 B.4
    assert tfr.crc32c_python(b"123456789") == 0xE3069283
    assert tfr.crc32c_python(bytes(32)) == 0x8A9136AA
    assert tfr.crc32c_python(b"\xff" * 32) == 0x62A8AB43
    assert tfr.crc32c(b"123456789") == 0xE3069283  # the C package when installed, same results


def test_masked_crc_matches_tfrecord_framing(tmp_path):
    data = b"hello tfrecord"
    framed = tfr.frame(data)
    length = struct.pack("<Q", len(data))
    assert framed[:8] == length
    crc = tfr.crc32c(length)
    assert struct.unpack("<I", framed[8:12])[0] == ((((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)
    path = tmp_path / "a.tfrecords"
    tfr.write_records(path, [data, b"", b"x" * 1000])
    assert list(tfr.read_records(path)) == [data, b"", b"x" * 1000]


def test_genuine_records_have_valid_checksums(shared_data):
    folder = shared_data / "meta_dataset" / "omniglot_small"
    files = sorted(folder.glob("*.tfrecords"))
    assert len(files) == 242
    n = sum(1 for f in files for _ in tfr.read_records(f))
    assert n == 242 * 20


def _corrupt(path, offset, value=None):
    data = bytearray(path.read_bytes())
    data[offset] = (data[offset] ^ 0x01) if value is None else value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where,message", [(3, "length field"), (12 + 5, "data checksum"), (-2, "data checksum")])
def test_corrupt_record_is_a_clear_error(tmp_path, where, message):
    path = tmp_path / "c.tfrecords"
    tfr.write_records(path, [b"first record", b"second record"])
    _corrupt(path, where if where >= 0 else path.stat().st_size + where)
    with pytest.raises(DataError, match=message) as e:
        list(tfr.read_records(path))
    assert str(path) in str(e.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.tfrecords"
    tfr.write_records(path, [b"a" * 100, b"b" * 100])
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) - 60, 5):
        path.write_bytes(data[:cut])
        with pytest.raises(DataError, match="truncated"):
            list(tfr.read_records(path))


def test_parse_genuine_example(shared_data):
    rec = next(tfr.read_records(shared_data / "meta_dataset" / "omniglot_small" / "17.tfrecords"))
    ex = tfr.parse_example(rec)
    assert sorted(ex) == ["image", "label"]
    assert ex["label"] == [17]
    assert ex["image"][0][:2] == b"\xff\xd8"  # a JPEG


def test_example_roundtrip_and_errors():
    feats = {"label": [-3, 0, 2**40], "image": [b"\x00\x01", b""], "f": [1.5, -2.0]}
    assert tfr.parse_example(tfr.encode_example(feats)) == feats
    with pytest.raises(DataError, match="not a valid tf.train.Example"):
        tfr.parse_example(b"\x0a\xff\xff")
