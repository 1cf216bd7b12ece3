"""The shared label vocabulary every dataset is mapped onto.

Each adapter keeps its dataset's own names in `source_labels` and maps them here, so that a probe
trained on one dataset's labels can be read against another's. Unknown or uncertain stays None:
it is never folded into negative.
"""
from __future__ import annotations

import hashlib

# Harmonised finding names (lower-case, underscores). Order is stable: manifests list labels in it.
VOCABULARY: tuple[str, ...] = (
    "no_finding",
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "edema",
    "effusion",
    "emphysema",
    "fibrosis",
    "hernia",
    "infiltration",
    "mass",
    "nodule",
    "pleural_thickening",
    "pneumonia",
    "pneumothorax",
    "enlarged_cardiomediastinum",
    "lung_lesion",
    "lung_opacity",
    "fracture",
    "support_devices",
    "aortic_enlargement",
    "calcification",
    "ild",
    "tuberculosis",
    "covid19",
    "other_lesion",
    "pleural_other",
    "clavicle_fracture",
    "lung_cavity",
    "lung_cyst",
    "mediastinal_shift",
    "rib_fracture",
    "abnormal",
)

_INDEX = {name: i for i, name in enumerate(VOCABULARY)}


def ordered(names) -> list[str]:
    """Names in vocabulary order (unknown names last, sorted), for stable manifests."""
    names = set(names)
    unknown = sorted(n for n in names if n not in _INDEX)
    return sorted((n for n in names if n in _INDEX), key=_INDEX.__getitem__) + unknown


def check_known(names) -> None:
    bad = sorted(set(names) - set(_INDEX))
    if bad:
        raise ValueError(f"labels not in the shared vocabulary: {bad}")


def patient_split(
    dataset: str, patient_id: str, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> str:
    """A deterministic patient-wise split for datasets without an official one.

    Hashing (dataset, patient, seed) means every image of a patient lands in the same split, in any
    order and any process, and adding images never moves an existing patient.
    """
    digest = hashlib.sha256(f"{seed}\0{dataset}\0{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    train, val, _ = fractions
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"


def carve_val(official: str, dataset: str, patient_id: str, seed: int, val_fraction: float) -> str:
    """A dataset's official split, with val carved by patient out of the official train split (for
    datasets that ship train and test only); other splits stay as they are."""
    if official != "train":
        return official
    return patient_split(dataset, patient_id, seed, (1.0 - val_fraction, val_fraction, 0.0))
