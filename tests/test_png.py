"""The shards' PNG files: standard PNGs that Pillow reads back exactly, decoded on a fast path when
every row is Up-filtered and by Pillow otherwise."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from leader.shards.png import _decode_up_filtered, decode_png, encode_png, undo_up_filter


def random_image(dtype, shape, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


def pillow_png(image: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", **save)
    return buf.getvalue()


def idat_rows(data: bytes, height: int) -> np.ndarray:
    at, idat = 8, b""
    while at < len(data):
        (length,) = struct.unpack_from(">I", data, at)
        if data[at + 4:at + 8] == b"IDAT":
            idat += data[at + 8:at + 8 + length]
        at += 12 + length
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, -1)


@pytest.mark.parametrize("dtype,shape", [(np.uint8, (1, 1)), (np.uint8, (37, 53)), (np.uint16, (20, 9)),
                                         (np.uint16, (64, 64))])
def test_round_trip_is_exact_and_pillow_reads_the_same_pixels(dtype, shape):
    image = random_image(dtype, shape)
    data = encode_png(image, 3)
    fast = _decode_up_filtered(data)
    assert fast is not None and fast.dtype == dtype and fast.flags.writeable
    np.testing.assert_array_equal(fast, image)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(np.array(im).astype(dtype), image)
    assert (idat_rows(data, shape[0])[:, 0] == 2).all()        # every row carries the Up filter


@pytest.mark.parametrize("height", [1, 2, 3, 5, 64, 100, 513])
def test_the_shifted_adds_undo_the_up_filter_as_a_running_sum_does(height):
    """The prefix sum in log2(height) shifted adds gives np.cumsum's bytes, wrapping modulo 256,
    for any height (a power of two or not) and from a strided view (the rows past their filter byte)."""
    rows = random_image(np.uint8, (height, 41), seed=height)
    decoded = undo_up_filter(rows[:, 1:])
    np.testing.assert_array_equal(decoded, np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8))
    assert decoded.flags.c_contiguous and decoded.flags.writeable


def test_other_pngs_are_decoded_by_pillow():
    gray = random_image(np.uint8, (30, 40))
    adaptive = pillow_png(gray)                                 # Pillow picks a filter per row
    assert _decode_up_filtered(adaptive) is None or np.array_equal(_decode_up_filtered(adaptive), gray)
    np.testing.assert_array_equal(decode_png(adaptive), gray)
    np.testing.assert_array_equal(decode_png(pillow_png(random_image(np.uint16, (12, 8)))),
                                  random_image(np.uint16, (12, 8)))
    rgb = random_image(np.uint8, (6, 5, 3))
    assert _decode_up_filtered(pillow_png(rgb)) is None
    np.testing.assert_array_equal(decode_png(pillow_png(rgb)), rgb)


def test_damaged_files_fail_as_pillow_fails():
    data = encode_png(random_image(np.uint8, (50, 50)), 3)
    for damaged in (data[: len(data) // 2], data[:8], b"not a png at all"):
        assert _decode_up_filtered(damaged) is None
        with pytest.raises(OSError):
            decode_png(damaged)


def test_encode_refuses_what_shards_never_hold():
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        encode_png(np.zeros((4, 4, 3), np.uint8), 3)
    with pytest.raises(ValueError, match="2-D uint8 or uint16"):
        encode_png(np.zeros((4, 4), np.float32), 3)


def test_a_header_that_lies_about_the_size_is_not_inflated_past_it():
    """IDAT holding far more than IHDR declares (a decompression bomb's shape) goes to Pillow,
    which reads only the rows the header declares, instead of being inflated whole."""
    image = random_image(np.uint8, (4, 4))
    data = encode_png(image, 3)
    bomb_rows = np.zeros((4096, 4097), np.uint8)
    bomb_rows[:, 0] = 2
    at = data.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", data, at)
    body = zlib.compress(bomb_rows.tobytes(), 9)
    chunk = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    lying = data[:at] + chunk + data[at + 12 + length:]
    assert _decode_up_filtered(lying) is None
    assert decode_png(lying).shape == (4, 4)
