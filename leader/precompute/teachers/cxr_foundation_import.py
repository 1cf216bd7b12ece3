"""`cxr-foundation-import`: CXR Foundation embeddings that users already hold, one file per image.

    teacher = create_teacher("cxr-foundation-import", model="mimic-cxr-embeddings/")
    embeddings, found = teacher.lookup(["0a1b2c3d-...", "00000001_000.png"])

CXR Foundation v1 was only ever served by Google's API, so its embeddings exist as files
(docs/design.md, section 6), in any of these forms under one directory, nested as deep as needed:

- `<image stem>.npy`: a 1-D vector (what the official LeADER code reads);
- `<image stem>.npz`: the array `embedding`, or the only array inside;
- `<image stem>.tfrecord`: PhysioNet's MIMIC-CXR release, `files/pXX/pYYY/sZZZ/<dicom_id>.tfrecord`,
  one tf.train.Example whose float_list `embedding` is the vector. These are read here without
  TensorFlow: the TFRecord framing and the few protobuf fields needed are simple to parse.

An image id finds its file by its relative path without the suffix, or else by file stem; an id's own
image suffix (.png, .jpg, .dcm, ...) is ignored. A missing file gives a NaN row with found=False: the
precompute loop counts and reports those. A file that is not a finite 1-D vector of the common
dimension is an error naming the file. The embeddings were computed on the un-augmented image, so
this teacher has view 0 only (`max_views = 1`).
"""
from __future__ import annotations

import hashlib
import struct
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np

from leader.errors import LeaderError
from leader.io import sha256_file
from leader.precompute.teachers import register_teacher
from leader.precompute.teachers.base import Teacher, local_model_path

EMBEDDING_SUFFIXES = (".npy", ".npz", ".tfrecord")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".mha", ".img", ".tif", ".tiff")
TFRECORD_FEATURE = "embedding"


@register_teacher("cxr-foundation-import")
class CxrFoundationImportTeacher(Teacher):
    kind = "cxr-foundation-import"
    input_size = None
    needs_pixels = False
    max_views = 1

    def __init__(self, model: str | Path | None, device: str = "cpu", allow_remote: bool = False,
                 dim: int | None = None):
        self.root = local_model_path(model, self.kind, want="dir", remote_possible=False)
        self.files = _index(self.root)
        if not self.files:
            raise LeaderError(f"teacher {self.kind!r}: no {'/'.join(EMBEDDING_SUFFIXES)} files under {str(self.root)!r}")
        self._by_stem: dict[str, list[str]] = defaultdict(list)
        for relative in self.files:
            self._by_stem[PurePosixPath(relative).name].append(relative)

        first = self.files[min(self.files)]
        self.dim = int(dim) if dim else len(read_embedding(first))
        self.read(first)   # the first file must itself agree with an explicit dim
        self.fingerprint = _fingerprint(self.root, self.files.values())
        counts = defaultdict(int)
        for path in self.files.values():
            counts[path.suffix] += 1
        self.preprocessing = {
            "source": "precomputed embeddings, one file per image (computed by the provider on the un-augmented image)",
            "files": dict(sorted(counts.items())), "match": "image id = relative path or file stem",
            "views": "view 0 only",
        }

    def lookup(self, image_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        embeddings = np.full((len(image_ids), self.dim), np.nan, np.float32)
        found = np.zeros(len(image_ids), bool)
        for row, image_id in enumerate(image_ids):
            path = self.find(image_id)
            if path is not None:
                embeddings[row] = self.read(path)
                found[row] = True
        return embeddings, found

    def find(self, image_id: str) -> Path | None:
        """The file holding `image_id`'s embedding, or None."""
        for name in _candidate_names(image_id):
            if name in self.files:
                return self.files[name]
            matches = self._by_stem.get(PurePosixPath(name).name, [])
            if len(matches) > 1:
                raise LeaderError(f"teacher {self.kind!r}: image id {image_id!r} matches {len(matches)} files "
                                  f"({', '.join(sorted(matches)[:3])}); use ids that include the folder")
            if matches:
                return self.files[matches[0]]
        return None

    def read(self, path: Path) -> np.ndarray:
        vector = read_embedding(path)
        if len(vector) != self.dim:
            raise LeaderError(f"embedding file {str(path)!r} has dimension {len(vector)}; the other files have {self.dim}")
        return vector


def read_embedding(path: Path) -> np.ndarray:
    """One finite 1-D float32 vector from a .npy, .npz or .tfrecord file; anything else names the file."""
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = archive.files
                if "embedding" in names:
                    array = archive["embedding"]
                elif len(names) == 1:
                    array = archive[names[0]]
                else:
                    raise LeaderError(f"embedding file {str(path)!r} holds arrays {', '.join(names)}; expected 'embedding' or a single array")
        else:
            array = read_tfrecord_embedding(path)
    except LeaderError:
        raise
    except Exception as exc:
        raise LeaderError(f"cannot read embedding file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if array.ndim != 1 or array.size == 0:
        raise LeaderError(f"embedding file {str(path)!r} holds shape {array.shape}; expected one 1-D vector per image")
    if not np.issubdtype(array.dtype, np.number):
        raise LeaderError(f"embedding file {str(path)!r} holds {array.dtype} values, not numbers")
    vector = array.astype(np.float32)
    if not np.isfinite(vector).all():
        raise LeaderError(f"embedding file {str(path)!r} contains {int((~np.isfinite(vector)).sum())} NaN or infinite values")
    return vector


def read_tfrecord_embedding(path: Path, feature: str = TFRECORD_FEATURE) -> np.ndarray:
    records = read_tfrecord(path.read_bytes())
    if len(records) != 1:
        raise LeaderError(f"TFRecord {str(path)!r} holds {len(records)} records; expected one Example per image")
    values = example_float_list(records[0], feature)
    if values is None:
        raise LeaderError(f"TFRecord {str(path)!r} has no float_list feature {feature!r}")
    return values


# TFRecord framing: uint64 length, masked crc32c(length), data, masked crc32c(data); little-endian.

def read_tfrecord(data: bytes) -> list[bytes]:
    records, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise ValueError(f"truncated record header at byte {pos}")
        (length,) = struct.unpack_from("<Q", data, pos)
        (length_crc,) = struct.unpack_from("<I", data, pos + 8)
        if _masked_crc32c(data[pos:pos + 8]) != length_crc:
            raise ValueError(f"length checksum mismatch at byte {pos}")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"record at byte {pos} claims {length} bytes but the file ends first")
        (data_crc,) = struct.unpack_from("<I", data, end)
        if _masked_crc32c(data[start:end]) != data_crc:
            raise ValueError(f"data checksum mismatch in the record at byte {pos}")
        records.append(data[start:end])
        pos = end + 4
    return records


def _masked_crc32c(data: bytes) -> int:
    import google_crc32c  # installed with zarr, which uses it for its own checksums

    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# Protobuf wire format, just enough of tf.train.Example:
#   Example{features=1: Features{feature=1: map entry{key=1: string, value=2: Feature}}}
#   Feature{bytes_list=1 | float_list=2 | int64_list=3}; FloatList{value=1: packed or single floats}

def example_float_list(example: bytes, name: str) -> np.ndarray | None:
    """The float_list feature `name` of a serialized tf.train.Example, or None if absent."""
    for number, _, features in _fields(example, wanted_wire=2):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features, wanted_wire=2):
            if entry_number != 1:
                continue
            key, feature = None, b""
            for field, _, value in _fields(entry, wanted_wire=2):
                if field == 1:
                    key = value.decode("utf-8")
                elif field == 2:
                    feature = value
            if key == name:
                return _float_list(feature, name)
    return None


def _float_list(feature: bytes, name: str) -> np.ndarray:
    kinds = {1: "bytes_list", 3: "int64_list"}
    parts: list[np.ndarray] = []
    for number, _, value in _fields(feature, wanted_wire=2):
        if number in kinds:
            raise ValueError(f"feature {name!r} is a {kinds[number]}, not a float_list")
        if number != 2:
            continue
        for field, wire, item in _fields(value):
            if field != 1:
                continue
            if wire == 2:
                if len(item) % 4:
                    raise ValueError(f"packed float_list {name!r} has {len(item)} bytes, not a multiple of 4")
                parts.append(np.frombuffer(item, "<f4"))
            elif wire == 5:
                parts.append(np.frombuffer(item, "<f4"))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _fields(buffer: bytes, wanted_wire: int | None = None) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of each field; with wanted_wire, other wire types are skipped."""
    pos = 0
    while pos < len(buffer):
        key, pos = _varint(buffer, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buffer, pos)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = buffer[pos:pos + width], pos + width
        elif wire == 2:
            length, pos = _varint(buffer, pos)
            value, pos = buffer[pos:pos + length], pos + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buffer):
            raise ValueError("truncated protobuf message")
        if wanted_wire is None or wire == wanted_wire:
            yield number, wire, value


def _varint(buffer: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos


def _index(root: Path) -> dict[str, Path]:
    """Relative path without its suffix (posix) -> file, for every embedding file under root."""
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix not in EMBEDDING_SUFFIXES or not path.is_file():
            continue
        name = path.relative_to(root).with_suffix("").as_posix()
        if name in files:
            raise LeaderError(f"two embedding files for one image: {str(files[name])!r} and {str(path)!r}")
        files[name] = path
    return files


def _candidate_names(image_id: str) -> list[str]:
    name = image_id.replace("\\", "/").strip("/")
    candidates = [name]
    if PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES:
        candidates.append(str(PurePosixPath(name).with_suffix("")))
    return candidates


def _fingerprint(root: Path, paths: Iterable[Path]) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs: changes when any file does."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(sha256_file(path).encode())
        digest.update(b"\n")
    return digest.hexdigest()
