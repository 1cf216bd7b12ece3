"""Write tiny but real image files for the dataset tests: DICOM (uncompressed, JPEG baseline,
JPEG 2000, RLE), 8/16-bit PNG and JPEG, and small CSV helpers.

Every file is written with the same library a hospital export or a dataset release would be read
with (pydicom, Pillow), so the adapters are tested on the real formats, not on stand-ins.
"""
from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

# A small DX "radiograph": a smooth gradient plus a bright disc, so no fixture image is constant.


def phantom(height: int = 64, width: int = 64, *, bits: int = 8, seed: int = 0) -> np.ndarray:
    """A non-constant grey image using ``bits`` of range (uint8 for bits <= 8, else uint16)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (xx + yy) / float(height + width - 2)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, height / 5
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float64)
    unit = np.clip(0.2 + 0.6 * base + 0.2 * disc, 0.0, 1.0)
    top = (1 << bits) - 1
    return np.rint(unit * top).astype(np.uint8 if bits <= 8 else np.uint16)


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: tuple[float, float] | tuple[Sequence[float], Sequence[float]] | None = None,
    voi_function: str | None = None,
    rescale: tuple[float, float] | None = None,
    voi_lut: tuple[int, int, Sequence[int]] | None = None,
    compression: str | None = None,
    signed: bool = False,
    include_pixels: bool = True,
    patient_id: str = "ANON",
    view: str | None = "PA",
    extra: dict | None = None,
) -> Path:
    """Write ``pixels`` as a DX DICOM file.

    compression: None (explicit VR little endian), "jpeg" (JPEG baseline 8-bit, encoded with Pillow
    and encapsulated), "j2k" (JPEG 2000 lossless via pydicom's encoder) or "rle" (RLE lossless).
    window: (centre, width), each a number or a list (multi-valued). rescale: (slope, intercept).
    voi_lut: (n_entries, first_mapped, table) for a VOI LUT Sequence.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        JPEG2000Lossless,
        RLELossless,
        generate_uid,
    )

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels)
    colour = pixels.ndim == 3
    allocated = 8 if pixels.dtype.itemsize == 1 else 16
    bits_stored = bits_stored or allocated

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = patient_id
    if view is not None:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        n_entries, first_mapped, table = voi_lut
        item = Dataset()
        item.LUTDescriptor = [n_entries, first_mapped, 16]
        item["LUTDescriptor"].VR = "US"
        item.LUTData = [int(v) for v in table]
        item["LUTData"].VR = "US"
        ds.VOILUTSequence = [item]
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    if include_pixels:
        if compression is None:
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        elif compression == "jpeg":
            from pydicom.encaps import encapsulate
            from PIL import Image

            if pixels.dtype != np.uint8:
                raise ValueError("JPEG baseline holds 8-bit pixels only")
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
            meta.TransferSyntaxUID = JPEGBaseline8Bit
            if colour:
                ds.PhotometricInterpretation = "YBR_FULL_422"
        elif compression in ("j2k", "rle"):
            ds.PixelData = np.ascontiguousarray(pixels).tobytes()
            ds.compress(JPEG2000Lossless if compression == "j2k" else RLELossless)
        else:
            raise ValueError(f"unknown compression {compression!r}")
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """8-bit (``L``), 16-bit (``I;16``) or RGB PNG, by the array's dtype and shape."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels)).save(path, format="PNG")
    return path


def write_jpeg(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path, format="JPEG", quality=95)
    return path


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence], *, gz: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def corrupt(path: Path, *, keep: float = 0.5) -> Path:
    """Truncate a file in place to ``keep`` of its bytes (a download cut short)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def build_with_cli(dataset: str, root: Path, out: Path, *options: str, size: int = 64):
    """Run `leader shards build DATASET --root ROOT --out OUT` and return (manifest, samples, rejects).

    The fixtures contain deliberately bad rows and files, far more than the default 1% reject
    threshold of a real build, so the threshold is lifted here.
    """
    import json

    from typer.testing import CliRunner

    from leader.cli import app
    from leader.shards.manifest import Manifest
    from leader.shards.layout import iter_samples

    args = ["shards", "build", dataset, "--root", str(root), "--out", str(out), "--size", str(size),
            "--max-reject-fraction", "1", *options]
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        raise AssertionError(f"leader {' '.join(args)} failed ({result.exit_code}):\n{result.output}\n{result.exception!r}")
    manifest = Manifest.load(out)
    samples = {s.meta["image_id"]: s for s in iter_samples(out)}
    rejects = [json.loads(line) for line in (Path(out) / "rejects.jsonl").read_text().splitlines()]
    return manifest, samples, rejects


def reasons(rejects) -> dict[str, str]:
    """path -> reason, for a RejectLog or a list of reject dicts."""
    entries = getattr(rejects, "entries", rejects)
    return {e["path"]: e["reason"] for e in entries}
