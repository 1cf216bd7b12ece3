"""Decode any chest X-ray file a dataset ships into one 2-D grayscale array.

Output dtype rules (the only two the rest of the system sees):

- 8-bit sources (8-bit PNG/JPEG, 8-bit DICOM, uint8 MHA) come back as ``uint8`` with their values
  untouched (DICOM: after its window, see below).
- Anything deeper (16-bit PNG with 10-16 bits used, 12-16-bit DICOM, int16/float MHA, raw 12-bit)
  comes back as ``uint16`` stretched linearly to the full 0..65535 range, so relative intensities
  are preserved and the PNG the builder writes uses its whole depth. This matches how CXR
  Foundation turns non-uint8 images into its 16-bit input PNG.

DICOM follows the radiology display pipeline, in this order: stored pixels -> modality LUT
(rescale slope/intercept or a modality LUT table) -> VOI LUT table or window centre/width (the first
value when several are given) -> MONOCHROME1 inversion, which comes after the VOI because a window
is defined on the un-inverted values -> scale to the output dtype. A DICOM with no usable VOI in its
header is windowed on the min..max of its own pixel data.

Every way a file can fail raises `UnreadableImage`, whose message is the reason the builder writes
to rejects.jsonl. Constant images (all pixels equal) are rejected as "blank image": they carry no
signal and usually mean a broken export.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = [
    "UnreadableImage",
    "read_image",
    "read_dicom",
    "read_raw",
    "stretch_to_uint16",
]


class UnreadableImage(Exception):
    """A file that cannot be turned into a usable image; the message is the reason."""


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_JP2_MAGIC = b"\x00\x00\x00\x0cjP  "
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*")
_BMP_MAGIC = b"BM"
_GIF_MAGICS = (b"GIF87a", b"GIF89a")

_DICOM_EXTENSIONS = {".dcm", ".dicom", ".dic"}

# Photometric interpretations we can turn into one grey channel. PALETTE COLOR is refused: its
# colours are an arbitrary lookup, and no chest X-ray dataset ships one, so it signals a wrong file.
_MONOCHROME = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR_TO_GREY = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"}


# ----------------------------------------------------------------------------------------------
# Public entry points


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG/JPEG/TIFF, DICOM, MHA/MHD/NRRD file as a 2-D ``uint8`` or ``uint16`` array.

    The format is chosen by the file's content (magic bytes) first and its extension second, so a
    DICOM saved as ``.png`` or a PNG without an extension still reads. Raises `UnreadableImage`
    for a missing, empty, truncated, blank or unsupported file.
    """
    path = Path(path)
    head = _read_head(path)
    kind = _sniff(head, path)
    if kind == "pillow":
        image = _read_pillow(path)
    elif kind == "dicom":
        image = read_dicom(path)
    elif kind == "itk":
        image = _read_itk(path)
    else:
        raise UnreadableImage(
            f"not an image: extension {path.suffix or '(none)'!r} but the file starts with {head[:16]!r}"
        )
    return _check_not_blank(image)


def read_dicom(
    path: str | os.PathLike, window: tuple[float, float] | None = None
) -> np.ndarray:
    """Read one single-frame DICOM radiograph for display, as ``uint8`` or ``uint16``.

    ``window`` = (centre, width) in modality units overrides the header's VOI. Without it the
    header's VOI LUT table is used, else its first WindowCenter/WindowWidth pair (with its
    VOILUTFunction; a pair with a width <= 0 is unusable and ignored), else the min..max of the
    modality values. The result is ``uint8`` when BitsStored <= 8, else ``uint16`` over the full
    range. Colour (RGB/YBR) DICOMs are reduced to their luminance first.
    """
    path = Path(path)
    ds = _dcmread(path)
    if "PixelData" not in ds:
        kinds = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        what = f"only {kinds[0]}, which radiographs never use" if kinds else "no pixel data"
        raise UnreadableImage(f"DICOM has {what}")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in _MONOCHROME and photometric not in _COLOUR_TO_GREY:
        raise UnreadableImage(f"unsupported DICOM photometric interpretation {photometric!r}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise UnreadableImage(f"DICOM has {frames} frames; expected a single radiograph")

    stored = _decode_pixels(ds)
    if photometric in _COLOUR_TO_GREY:
        # pydicom hands colour data back as RGB (it converts YBR itself), so luminance suffices.
        stored = _rgb_to_grey(stored)
    if stored.ndim != 2:
        raise UnreadableImage(f"DICOM pixel data has shape {stored.shape}; expected one 2-D image")

    values = _modality_lut(stored, ds)
    display = _voi(values, ds, window)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    return _quantise(display, eight_bit=bits_stored <= 8)


def read_raw(
    path: str | os.PathLike,
    shape: tuple[int, int],
    dtype: str | np.dtype = "uint16",
    byteorder: str = "big",
    invert: bool = False,
) -> np.ndarray:
    """Read a headerless raw image (e.g. JSRT's 2048x2048 12-bit big-endian ``.IMG``).

    ``byteorder`` is "big"/"little" (or ">"/"<"). The file size must match ``shape`` exactly.
    ``invert`` flips bright and dark (JSRT stores X-ray attenuation the other way round from a
    display), and is applied after stretching to the data's own min..max. A ``uint8`` raw stays
    ``uint8``; deeper types become full-range ``uint16``.
    """
    path = Path(path)
    order = {"big": ">", ">": ">", "little": "<", "<": "<", "=": "=", "native": "="}.get(byteorder)
    if order is None:
        raise ValueError(f"byteorder must be 'big' or 'little', got {byteorder!r}")
    dt = np.dtype(dtype).newbyteorder(order)
    rows, cols = (int(s) for s in shape)
    expected = rows * cols * dt.itemsize
    size = _read_size(path)
    if size != expected:
        raise UnreadableImage(
            f"raw file has {size} bytes; expected {expected} for {rows}x{cols} {np.dtype(dtype).name}"
        )
    data = np.fromfile(path, dtype=dt).reshape(rows, cols)
    if dt.itemsize == 1 and dt.kind == "u" and not invert:
        return _check_not_blank(data.astype(np.uint8))
    unit = _unit_range(data.astype(np.float64))
    if invert:
        unit = 1.0 - unit
    return _check_not_blank(_quantise(unit, eight_bit=dt.itemsize == 1))


def stretch_to_uint16(values: np.ndarray) -> np.ndarray:
    """Linearly map an array's min..max onto 0..65535 (``uint16``); rejects constant arrays."""
    values = np.asarray(values)
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2:
        # Up to 16-bit integers: map each possible value once through a lookup table. Same
        # numbers as the float path, about six times faster on a 2048x2048 PadChest PNG.
        low, high = int(values.min()), int(values.max())
        if high == low:
            raise UnreadableImage(f"blank image (every pixel is {low})")
        table = _quantise(np.arange(high - low + 1, dtype=np.float64) / (high - low), eight_bit=False)
        index = values.astype(np.int32)
        index -= low
        return table[index]
    return _quantise(_unit_range(values.astype(np.float64)), eight_bit=False)


# ----------------------------------------------------------------------------------------------
# Format detection


def _read_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise UnreadableImage("file not found") from None
    except OSError as e:
        raise UnreadableImage(f"cannot stat file: {e.strerror or e}") from None


def _read_head(path: Path) -> bytes:
    if _read_size(path) == 0:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            return f.read(132)
    except IsADirectoryError:
        raise UnreadableImage("is a directory, not an image file") from None
    except OSError as e:
        raise UnreadableImage(f"cannot open file: {e.strerror or e}") from None


def _sniff(head: bytes, path: Path) -> str | None:
    if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC) or head.startswith(_JP2_MAGIC):
        return "pillow"
    if head.startswith(_TIFF_MAGICS) or head.startswith(_GIF_MAGICS):
        return "pillow"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"NRRD") or head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "itk"
    suffixes = [s.lower() for s in path.suffixes]
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _DICOM_EXTENSIONS:
        # Old DICOMs may lack the 128-byte preamble + "DICM"; pydicom can still parse them forced.
        return "dicom"
    if head.startswith(_BMP_MAGIC) and suffix == ".bmp":
        return "pillow"
    if suffix in {".nii"} or suffixes[-2:] == [".nii", ".gz"]:
        return "itk"
    return None


# ----------------------------------------------------------------------------------------------
# Pillow formats


def _read_pillow(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here and not later
            return _pillow_to_grey(im)
    except UnidentifiedImageError:
        raise UnreadableImage("Pillow cannot identify the image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        reason = str(e)
        if "truncated" in reason.lower():
            raise UnreadableImage(f"truncated image file ({reason})") from None
        raise UnreadableImage(f"cannot decode image: {reason}") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImage(f"image too large: {e}") from None


def _pillow_to_grey(im) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    if mode.startswith("I;16"):
        return stretch_to_uint16(np.asarray(im))
    if mode in ("I", "F"):
        data = np.asarray(im)
        return stretch_to_uint16(data)
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = np.asarray(im.convert("RGB"))
        # Many X-rays are saved as RGB with three equal channels: keep those values exactly.
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            return rgb[..., 0].copy()
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8).copy()
    # Palette, grey+alpha, bilevel: Pillow's own conversion applies the palette / drops alpha.
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# ITK formats


def _read_itk(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UnreadableImage(f"SimpleITK cannot read the file: {first[-1] if first else e}") from None
    data = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        data = _rgb_to_grey(data[..., :3].astype(np.float64))
    data = np.squeeze(data)
    if data.ndim != 2:
        raise UnreadableImage(f"expected a 2-D image, found an array of shape {data.shape}")
    if data.dtype == np.uint8:
        return data.copy()
    return stretch_to_uint16(data)


# ----------------------------------------------------------------------------------------------
# DICOM


def _dcmread(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    except Exception as e:  # pydicom raises a range of types for a damaged header
        raise UnreadableImage(f"cannot parse DICOM header: {e}") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:
        raise UnreadableImage(f"not a DICOM file: {e}") from None
    if not any(k in ds for k in ("PixelData", "Rows", "SOPClassUID", "Modality")):
        raise UnreadableImage("not a DICOM file: no DICM marker and no recognisable image elements")
    # A forced read of a preamble-less file has no transfer syntax; the encoding pydicom
    # detected while parsing tells us what the pixel bytes are.
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        if implicit is None:
            raise UnreadableImage("not a DICOM file: no recognisable data elements")
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _decode_pixels(ds) -> np.ndarray:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    name = getattr(syntax, "name", str(syntax))
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:  # missing decoder plugin, corrupt codestream, short pixel data...
        raise UnreadableImage(f"cannot decode DICOM pixel data ({name}): {e}") from None


def _modality_lut(stored: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    try:
        values = apply_modality_lut(stored, ds)
    except Exception as e:
        raise UnreadableImage(f"invalid DICOM modality LUT / rescale: {e}") from None
    return np.asarray(values, dtype=np.float64)


def _voi(values: np.ndarray, ds, window: tuple[float, float] | None) -> np.ndarray:
    """Map modality values to [0, 1] display values (0 = black before any MONOCHROME1 flip)."""
    if window is not None:
        centre, width = (float(v) for v in window)
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return _window(values, centre, width, "LINEAR")
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        return _voi_table(values, ds)
    header_window = _header_window(ds)
    if header_window is not None:
        centre, width = header_window
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
        return _window(values, centre, width, function)
    return _unit_range(values)


def _header_window(ds) -> tuple[float, float] | None:
    """The first (centre, width) pair of the header, or None when absent or unusable (width <= 0)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    def first(value) -> float | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
        try:
            number = float(value)
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) else None

    centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
    if centre is None or width is None or width <= 0:
        return None
    return centre, width


def _window(values: np.ndarray, centre: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - centre) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - centre) / width + 0.5, 0.0, 1.0)
    # LINEAR (the default, and the meaning of any unknown function name). The standard requires
    # width >= 1 here; narrower windows degrade to a threshold at the centre.
    if width <= 1:
        return (values > centre - 0.5).astype(np.float64)
    return np.clip((values - (centre - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _voi_table(values: np.ndarray, ds) -> np.ndarray:
    """Apply the first VOI LUT table, normalised by the table's own output range."""
    item = ds.VOILUTSequence[0]
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        raw = item.LUTData
        if isinstance(raw, (bytes, bytearray)):  # OW: little-endian words (8-bit tables too)
            table = np.frombuffer(raw, dtype="<u2")
        else:
            table = np.atleast_1d(np.asarray(raw))
        table = table.astype(np.float64)
    except Exception as e:
        raise UnreadableImage(f"invalid DICOM VOI LUT sequence: {e}") from None
    if table.size == 0:
        raise UnreadableImage("invalid DICOM VOI LUT sequence: empty LUTData")
    first_mapped = descriptor[1]
    # Values below the first entry take the first output, above the last take the last output.
    index = np.clip(np.rint(values - first_mapped), 0, table.size - 1).astype(np.intp)
    out = table[index]
    low, high = float(table.min()), float(table.max())
    if high <= low:
        raise UnreadableImage("blank image: the DICOM VOI LUT maps every value to one output")
    return (out - low) / (high - low)


# ----------------------------------------------------------------------------------------------
# Shared numeric helpers


def _rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4):
        return rgb
    rgb = rgb[..., :3].astype(np.float64)
    return rgb @ np.array([0.299, 0.587, 0.114])


def _unit_range(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise UnreadableImage("blank image (no finite pixel values)")
        values = np.where(finite, values, np.nanmin(np.where(finite, values, np.nan)))
    low, high = float(values.min()), float(values.max())
    if high <= low:
        raise UnreadableImage(f"blank image (every pixel is {low:g})")
    return (values - low) / (high - low)


def _quantise(unit: np.ndarray, *, eight_bit: bool) -> np.ndarray:
    top = 255 if eight_bit else 65535
    out = np.rint(np.clip(unit, 0.0, 1.0) * top)
    return out.astype(np.uint8 if eight_bit else np.uint16)


def _check_not_blank(image: np.ndarray) -> np.ndarray:
    if image.ndim != 2:
        raise UnreadableImage(f"expected a 2-D image, found an array of shape {image.shape}")
    if image.size == 0:
        raise UnreadableImage("empty image (0 pixels)")
    low, high = image.min(), image.max()
    if low == high:
        raise UnreadableImage(f"blank image (every pixel is {low})")
    return image
