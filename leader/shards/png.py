"""The PNG files inside shards: grayscale, 8 or 16 bits, every row filtered with PNG's "Up" filter.

    data = encode_png(image, compression=3)     # a standard PNG any viewer opens
    image = decode_png(data)                    # uint8 or uint16 (H, W), as stored

Decoding is the largest cost of streaming a shard: inflating the zlib stream, then undoing the row
filters. Pillow picks a filter per row (Paeth among them), which must be undone pixel by pixel.
With "Up" on every row, each byte is the difference from the byte above it, so a prefix sum down
the columns undoes the whole image. Measured on the 128 px phantom shards of the CPU benchmark:
0.19 ms per image through Pillow, about 0.07 ms this way. The files are ordinary PNGs; a PNG that
is not in this form (a shard written by an older leader, say) is decoded by Pillow.

At 512 px (`python -m benchmarks run --only loader_stages`) the two halves were chosen on
measurements: libdeflate inflates the stream 3.6x faster than zlib (1.0 against 3.6 ms per image
on a loaded 2-core sandbox; isal: 2.6 ms), and the prefix sum done as log2(height) shifted adds
of the whole image takes 0.34 ms where np.cumsum down the columns took 2.1 ms.
"""
from __future__ import annotations

import io
import struct
import zlib

import deflate
import numpy as np
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILTER_NONE, FILTER_UP = 0, 2
GRAYSCALE = 0


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(image: np.ndarray, compression: int) -> bytes:
    """A grayscale PNG of a 2-D uint8 or uint16 image, every row Up-filtered, zlib at `compression`."""
    if image.ndim != 2 or image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png takes a 2-D uint8 or uint16 image, got {image.dtype} {image.shape}")
    height, width = image.shape
    bits = 8 * image.dtype.itemsize
    rows = np.ascontiguousarray(image, dtype=image.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    filtered = np.empty((height, rows.shape[1] + 1), dtype=np.uint8)
    filtered[:, 0] = FILTER_UP
    filtered[:, 1:] = rows
    filtered[1:, 1:] -= rows[:-1]                     # each byte minus the byte above it, modulo 256
    header = struct.pack(">IIBBBBB", width, height, bits, GRAYSCALE, 0, 0, 0)
    return b"".join((SIGNATURE, _chunk(b"IHDR", header),
                     _chunk(b"IDAT", zlib.compress(filtered.tobytes(), compression)), _chunk(b"IEND", b"")))


def decode_png(data: bytes) -> np.ndarray:
    """The image of a PNG: uint8 or uint16 (H, W) for grayscale; what Pillow reads for anything else."""
    image = _decode_up_filtered(data)
    return image if image is not None else _decode_with_pillow(data)


def _decode_up_filtered(data: bytes) -> np.ndarray | None:
    """The fast path; None where the file is not a grayscale, non-interlaced PNG of Up or None rows."""
    if not data.startswith(SIGNATURE):
        return None
    view, at, header, idat = memoryview(data), len(SIGNATURE), None, []
    while at + 8 <= len(data):
        (length,), kind = struct.unpack_from(">I", data, at), data[at + 4:at + 8]
        body = view[at + 8:at + 8 + length]
        if len(body) != length:
            return None                                  # cut short: Pillow names the damage
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        at += 12 + length
    if header is None or not idat:
        return None
    width, height, bits, color, _, _, interlace = header
    if color != GRAYSCALE or bits not in (8, 16) or interlace:
        return None
    if not 0 < width * height <= (Image.MAX_IMAGE_PIXELS or 2**62):
        return None                                      # Pillow's decompression-bomb rules apply
    row_bytes = width * bits // 8
    expected = height * (row_bytes + 1)
    compressed = idat[0] if len(idat) == 1 else b"".join(idat)
    try:
        # The first row's filter byte first: a PNG from another writer rarely starts with Up or
        # None, and is then handed to Pillow without being inflated twice.
        if zlib.decompressobj().decompress(compressed, 1) not in (bytes([FILTER_UP]), bytes([FILTER_NONE])):
            return None
        # Room for one byte more than the header promises: a longer (or cut short) stream fails
        # here and goes to Pillow, so nothing is ever inflated past the declared size.
        raw = deflate.zlib_decompress(compressed, expected + 1)
    except (zlib.error, deflate.DeflateError):
        return None
    if len(raw) != expected:
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, row_bytes + 1)
    filters = rows[:, 0]
    if (filters == FILTER_UP).all():
        pixels = undo_up_filter(rows[:, 1:])
    elif (filters == FILTER_NONE).all():
        pixels = rows[:, 1:]
    else:
        return None
    if bits == 8:
        return np.ascontiguousarray(pixels)
    return pixels.copy().view(">u2").astype(np.uint16).reshape(height, width)


def undo_up_filter(filtered: np.ndarray) -> np.ndarray:
    """Rows of Up-filtered bytes -> the bytes themselves: each row plus the decoded row above it,
    modulo 256 (uint8 arithmetic wraps as the filter did).

    That is a prefix sum down the columns, done as log2(height) steps that each add the image
    shifted down by 1, 2, 4, ... rows (Hillis and Steele's scan): every step is one vectorised
    add over the whole image, where np.cumsum walks the columns element by element.
    """
    a = np.array(filtered, dtype=np.uint8)
    b = np.empty_like(a)
    shift = 1
    while shift < len(a):
        b[:shift] = a[:shift]
        np.add(a[shift:], a[:-shift], out=b[shift:])
        a, b = b, a
        shift *= 2
    return a


def _decode_with_pillow(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im)  # writable, so torch.from_numpy never warns
    if arr.dtype == np.int32:  # Pillow reads some 16-bit PNGs as mode "I"
        arr = arr.astype(np.uint16)
    return arr
