"""A procedural PA chest radiograph: the dataset `leader demo` runs on when there is no real data.

Every case is a pure function of (seed, patient, study). A patient draws a habitus (thorax width,
lung height, heart size, rib spacing, ...); each study of that patient draws a pose, an inspiration
depth, an exposure and its own findings. Each draw comes from its own sha256-seeded generator, so
a case is the same bytes in any process, in any order and for any dataset size, and raising one
disease's prevalence adds or removes that disease without redrawing the others.

Geometry lives in a canonical frame: x and y in [-1, 1], x to the image's right (the patient's
left, as a PA film is read), y down. A study's pose (rotation, scale, shift) maps it onto the image.
Every structure is a vectorised function of canonical coordinate arrays, so the same code paints
the pixels, places landmarks and measures lesion boxes: boxes and landmarks come from geometry
alone, without rendering, which lets the shard builder's workers render pixels in parallel.

Rendering accumulates an attenuation map (air 0, soft tissue about 1, bone above), maps it through
a film-like exposure curve, blurs it slightly and adds signal-dependent grain.
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from leader.errors import LeaderError
from leader.shards.records import SPLITS, Box
from leader.shards.vocabulary import patient_split

DISEASES: tuple[str, ...] = (
    "atelectasis",
    "cardiomegaly",
    "consolidation",
    "effusion",
    "mass",
    "nodule",
    "pneumothorax",
)

LANDMARKS: tuple[str, ...] = (
    "carina",
    "right_lung_apex",
    "left_lung_apex",
    "right_hilum",
    "left_hilum",
    "aortic_knob",
    "cardiac_apex",
    "right_cardiophrenic_angle",
    "right_costophrenic_angle",
    "left_costophrenic_angle",
)

# Independent per-study Bernoulli rates; together they leave about 46% of studies normal.
DEFAULT_PREVALENCE: dict[str, float] = {
    "atelectasis": 0.08,
    "cardiomegaly": 0.12,
    "consolidation": 0.12,
    "effusion": 0.12,
    "mass": 0.07,
    "nodule": 0.14,
    "pneumothorax": 0.07,
}

# Segmentation masks: one per finding class, then the anatomy the anatomy tasks can use.
ANATOMY_MASKS: tuple[str, ...] = ("right_lung", "left_lung", "heart")
MASK_CLASSES: tuple[str, ...] = DISEASES + ANATOMY_MASKS

_IMAGE_ID = re.compile(r"^(P\d{6})-s(\d+)$")


__all__ = [
    "DEFAULT_PREVALENCE", "DISEASES", "LANDMARKS", "MASK_CLASSES", "CaseDescription", "PhantomCase",
    "PhantomConfig", "describe_case", "generate_case", "phantom_index", "render_masks", "render_sample_grid",
]


@dataclass
class PhantomConfig:
    """What the phantom generates. Splits are assigned per patient; prevalences are per study."""

    size: int = 512  # side of the generated (original) image
    prevalence: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PREVALENCE))
    studies_per_patient: tuple[int, int] = (1, 3)
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15}
    )
    bits: int = 8  # 8 -> uint8; 16 -> uint16 holding 12 stored bits, as PadChest does

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 64:
            raise LeaderError(f"phantom size must be an integer of at least 64 pixels, got {self.size!r}")
        unknown = sorted(set(self.prevalence) - set(DISEASES))
        if unknown:
            raise LeaderError(f"phantom prevalence names unknown diseases {unknown}; known: {list(DISEASES)}")
        # Diseases left out of an override keep their default rate.
        self.prevalence = {**DEFAULT_PREVALENCE, **{k: float(v) for k, v in self.prevalence.items()}}
        bad = {k: v for k, v in self.prevalence.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise LeaderError(f"phantom prevalence must lie in [0, 1]: {bad}")
        lo, hi = self.studies_per_patient
        if not 1 <= lo <= hi:
            raise LeaderError(f"phantom studies_per_patient must satisfy 1 <= min <= max, got {(lo, hi)}")
        self.studies_per_patient = (int(lo), int(hi))
        if set(self.split_fractions) != set(SPLITS):
            raise LeaderError(
                f"phantom split_fractions needs exactly {list(SPLITS)}, got {sorted(self.split_fractions)}"
            )
        total = sum(self.split_fractions.values())
        if min(self.split_fractions.values()) < 0 or abs(total - 1.0) > 1e-6:
            raise LeaderError(f"phantom split_fractions must be non-negative and sum to 1, got {self.split_fractions}")
        if self.bits not in (8, 16):
            raise LeaderError(f"phantom bits must be 8 or 16, got {self.bits!r}")


@dataclass
class CaseDescription:
    """Everything about a case except its pixels; cheap to compute (no rendering)."""

    image_id: str
    patient_id: str
    study: int
    split: str
    view: str
    labels: dict[str, int]  # every disease -> 0/1
    boxes: list[Box]  # one per finding; continuous pixel coordinates, pixel (i, j) spans [i, i+1) x [j, j+1)
    landmarks: dict[str, tuple[float, float]]  # (x, y), continuous pixel coordinates
    anatomy: dict  # JSON-able floats: habitus, pose, cardiothoracic ratio, ...


@dataclass
class PhantomCase(CaseDescription):
    image: np.ndarray  # (size, size) uint8, or uint16 with 12 bits stored


# ---------------------------------------------------------------------------------------------
# Deterministic randomness and the case index


def _rng(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.sha256("\0".join(str(p) for p in (seed, *parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class _Draw:
    """Python-float draws from one keyed generator.

    Numpy float64 scalars would silently promote the float32 pixel maps to float64 (twice the
    work), so scalar parameters leave here as plain floats.
    """

    def __init__(self, seed: int, *parts: object):
        self.rng = _rng(seed, *parts)

    def uniform(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def normal(self, mean: float, sd: float) -> float:
        return float(self.rng.normal(mean, sd))

    def side(self) -> int:
        return -1 if self.rng.random() < 0.5 else 1


def _study_count(seed: int, patient_id: str, config: PhantomConfig) -> int:
    lo, hi = config.studies_per_patient
    return int(_rng(seed, "studies", patient_id).integers(lo, hi + 1))


def phantom_index(n: int, seed: int, config: PhantomConfig | None = None) -> list[tuple[str, str, int]]:
    """The first n images as (image_id, patient_id, study); a prefix of the list for any larger n."""
    config = config or PhantomConfig()
    if n < 0:
        raise LeaderError(f"phantom image count must be non-negative, got {n}")
    index: list[tuple[str, str, int]] = []
    patient = 0
    while len(index) < n:
        patient_id = f"P{patient:06d}"
        for study in range(1, _study_count(seed, patient_id, config) + 1):
            index.append((f"{patient_id}-s{study}", patient_id, study))
        patient += 1
    return index[:n]


def _parse_image_id(image_id: str) -> tuple[str, int]:
    match = _IMAGE_ID.match(image_id)
    if not match:
        raise LeaderError(f"phantom image id {image_id!r} is not of the form 'P000012-s1'")
    return match.group(1), int(match.group(2))


# ---------------------------------------------------------------------------------------------
# Anatomy: habitus per patient, pose, inspiration and exposure per study


@dataclass(frozen=True)
class Pose:
    """Maps canonical coordinates onto the normalised image square [-1, 1]^2."""

    angle_deg: float
    scale: float
    tx: float
    ty: float

    def to_image(self, x, y):
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        return self.scale * (c * x - s * y) + self.tx, self.scale * (s * x + c * y) + self.ty

    def to_canonical(self, xn, yn):
        c, s = math.cos(math.radians(self.angle_deg)), math.sin(math.radians(self.angle_deg))
        dx, dy = xn - self.tx, yn - self.ty
        return (c * dx + s * dy) / self.scale, (-s * dx + c * dy) / self.scale

    def to_pixels(self, x, y, size: int):
        """Continuous pixel coordinates: pixel (i, j) spans [i, i + 1) x [j, j + 1)."""
        xn, yn = self.to_image(x, y)
        return (xn + 1.0) * (size / 2.0), (yn + 1.0) * (size / 2.0)


@dataclass(frozen=True)
class Anatomy:
    """Canonical-frame geometry of one study. Sides: -1 is the patient's right (image left)."""

    thorax_half_width: float
    lung_top: float
    lung_egg: float  # > 0 widens the lungs towards their bases
    lung_squareness: float  # 0 = ellipse; towards 1 = fuller apices and flanks
    lung_cx: float  # |x| of both lung centres
    lung_cy: float
    lung_ax: float
    lung_ay: float
    dome_x_right: float
    dome_y_right: float
    dome_x_left: float
    dome_y_left: float
    diaphragm_drop: float  # how far each hemidiaphragm falls from its dome to the lateral wall
    mediastinum_half_width: float
    heart_x: float
    heart_y: float
    heart_a: float
    heart_b: float
    heart_tilt_deg: float
    knob_x: float
    knob_y: float
    knob_r: float
    trachea_x: float
    trachea_half_width: float
    carina_y: float
    hilum_right_x: float
    hilum_right_y: float
    hilum_left_x: float
    hilum_left_y: float
    rib_first_y: float
    rib_spacing: float
    rib_growth: float
    rib_width: float
    rib_curve: float
    clavicle_y: float
    clavicle_slope: float
    body_half_width: float
    spine_half_width: float
    vertebra_height: float
    vertebra_phase: float
    thoracic_width: float
    cardiothoracic_ratio: float

    def dome(self, side: int) -> tuple[float, float]:
        return (self.dome_x_right, self.dome_y_right) if side < 0 else (self.dome_x_left, self.dome_y_left)

    def hilum(self, side: int) -> tuple[float, float]:
        return (self.hilum_right_x, self.hilum_right_y) if side < 0 else (self.hilum_left_x, self.hilum_left_y)


@dataclass(frozen=True)
class Exposure:
    gain: float  # steepness of the film curve
    contrast: float
    brightness: float
    gamma: float
    heel: float  # linear brightness gradient across the film (anode heel effect)
    heel_angle_deg: float
    blur: float  # 0..1: how much of a 0.7 px binomial blur is mixed in
    grain: float


def _lateral_profile(ny, egg: float, squareness: float):
    """Half-width of the lung outline at normalised height ny, in units of lung_ax."""
    ny2 = ny * ny
    return (1.0 + egg * ny) * np.sqrt(np.clip(1.0 - ny2, 0.0, None) / (1.0 - squareness * ny2))


def _diaphragm_y(anat: Anatomy, side: int, x):
    dome_x, dome_y = anat.dome(side)
    half = anat.thorax_half_width - abs(dome_x)
    return dome_y + anat.diaphragm_drop * ((x - dome_x) * (1.0 / half)) ** 2


def _sample_anatomy(seed: int, patient_id: str, study: int, ctr_target: float | None) -> tuple[Anatomy, Pose]:
    hab = _Draw(seed, "habitus", patient_id)
    T = hab.uniform(0.60, 0.80)
    lung_top = hab.uniform(-0.80, -0.72)
    egg = hab.uniform(0.18, 0.32)
    squareness = hab.uniform(0.35, 0.6)
    dome_y_right = hab.uniform(0.22, 0.32)
    dome_gap = hab.uniform(0.03, 0.08)  # the left hemidiaphragm sits lower
    drop = hab.uniform(0.13, 0.20)
    dome_x_right = -T * hab.uniform(0.42, 0.52)
    dome_x_left = T * hab.uniform(0.50, 0.60)
    mediastinum = hab.uniform(0.085, 0.11)
    ctr_normal = hab.uniform(0.39, 0.47)
    heart_shape = hab.uniform(0.72, 0.86)  # minor / major axis
    heart_tilt = hab.uniform(22.0, 38.0)
    heart_shift = hab.uniform(0.28, 0.42)  # where the centre sits, as a share of the half-width
    knob_r = hab.uniform(0.06, 0.08)
    knob_y = hab.uniform(-0.46, -0.38)
    trachea_x = hab.uniform(-0.02, 0.01)
    trachea_half_width = hab.uniform(0.020, 0.028)
    carina_y = hab.uniform(-0.32, -0.25)
    hilum_right = (-(mediastinum + hab.uniform(0.07, 0.11)), hab.uniform(-0.12, -0.04))
    hilum_left = (mediastinum + hab.uniform(0.06, 0.10), hilum_right[1] - hab.uniform(0.02, 0.07))
    rib_first_y = hab.uniform(-0.88, -0.82)
    rib_spacing = hab.uniform(0.085, 0.10)
    rib_growth = hab.uniform(0.002, 0.005)
    rib_width = hab.uniform(0.38, 0.48)
    rib_curve = hab.uniform(0.14, 0.20)
    clavicle_y = hab.uniform(-0.74, -0.66)
    clavicle_slope = hab.uniform(-0.10, 0.0)
    body = hab.uniform(0.92, 1.04)
    spine = hab.uniform(0.075, 0.095)
    vertebra = hab.uniform(0.085, 0.10)
    vertebra_phase = hab.uniform(0.0, 1.0)

    st = _Draw(seed, "study", patient_id, study)
    # Patients are not positioned alike: a landmark's patch varies from study to study in angle,
    # size and surroundings, so naming it takes more than matching one template.
    pose = Pose(
        angle_deg=st.uniform(-15.0, 15.0), scale=st.uniform(0.80, 1.08),
        tx=st.uniform(-0.10, 0.10), ty=st.uniform(-0.08, 0.09),
    )
    inspiration = st.uniform(-0.035, 0.035)  # a deeper breath pushes both domes down
    dome_y_right += inspiration
    dome_y_left = dome_y_right + dome_gap

    # Lung outline: an egg-shaped squircle that the diaphragm cuts near its widest point, so the
    # costophrenic angle is sharp. Scale it so its widest point above the diaphragm reaches the
    # thorax half-width and its medial side tucks just behind the mediastinum.
    lung_bottom = dome_y_left + drop + 0.45
    lung_ay = (lung_bottom - lung_top) / 2.0
    lung_cy = lung_top + lung_ay
    ny = np.linspace(-1.0, (dome_y_right + drop - lung_cy) / lung_ay, 256)
    widest = float(_lateral_profile(ny, egg, squareness).max())
    overlap = 0.04
    draft = Anatomy(
        thorax_half_width=T, lung_top=lung_top, lung_egg=egg, lung_squareness=squareness,
        lung_cx=(T - overlap) / 2.0, lung_cy=lung_cy, lung_ax=(T + overlap) / (2.0 * widest), lung_ay=lung_ay,
        dome_x_right=dome_x_right, dome_y_right=dome_y_right, dome_x_left=dome_x_left,
        dome_y_left=dome_y_left, diaphragm_drop=drop, mediastinum_half_width=mediastinum,
        heart_x=0.0, heart_y=0.0, heart_a=0.1, heart_b=0.1, heart_tilt_deg=heart_tilt,
        knob_x=mediastinum - 0.5 * knob_r, knob_y=knob_y, knob_r=knob_r, trachea_x=trachea_x,
        trachea_half_width=trachea_half_width, carina_y=carina_y, hilum_right_x=hilum_right[0],
        hilum_right_y=hilum_right[1], hilum_left_x=hilum_left[0], hilum_left_y=hilum_left[1],
        rib_first_y=rib_first_y, rib_spacing=rib_spacing, rib_growth=rib_growth, rib_width=rib_width,
        rib_curve=rib_curve, clavicle_y=clavicle_y, clavicle_slope=clavicle_slope, body_half_width=body,
        spine_half_width=spine, vertebra_height=vertebra, vertebra_phase=vertebra_phase,
        thoracic_width=0.0, cardiothoracic_ratio=0.0,
    )
    width = _thoracic_width(draft)

    # Heart: a tilted ellipse whose horizontal extent sets the cardiothoracic ratio, resting on
    # (and partly hidden below) the left hemidiaphragm.
    ctr = ctr_normal if ctr_target is None else ctr_target
    tilt = math.radians(heart_tilt)
    half_extent = ctr * width / 2.0
    heart_a = half_extent / math.sqrt(math.cos(tilt) ** 2 + (heart_shape * math.sin(tilt)) ** 2)
    heart_b = heart_shape * heart_a
    vertical_extent = math.sqrt((heart_a * math.sin(tilt)) ** 2 + (heart_b * math.cos(tilt)) ** 2)
    heart_x = heart_shift * half_extent
    heart_y = float(_diaphragm_y(draft, +1, heart_x)) - 0.62 * vertical_extent
    anat = replace(
        draft, heart_x=heart_x, heart_y=heart_y, heart_a=heart_a, heart_b=heart_b,
        thoracic_width=width, cardiothoracic_ratio=2.0 * half_extent / width,
    )
    return anat, pose


def _thoracic_width(anat: Anatomy) -> float:
    """Widest distance between the lateral lung edges above the diaphragm (the CTR denominator)."""
    ny = np.linspace(-1.0, 1.0, 1024)
    y = anat.lung_cy + anat.lung_ay * ny
    reach = anat.lung_ax * _lateral_profile(ny, anat.lung_egg, anat.lung_squareness)
    total = 0.0
    for side in (-1, 1):
        x = side * (anat.lung_cx + reach)
        above = y < _diaphragm_y(anat, side, x)
        total += float(np.max(np.abs(x[above])))
    return total


def _sample_exposure(seed: int, patient_id: str, study: int) -> Exposure:
    ex = _Draw(seed, "exposure", patient_id, study)
    return Exposure(
        gain=ex.uniform(1.4, 1.8), contrast=ex.uniform(0.9, 1.1), brightness=ex.uniform(-0.05, 0.05),
        gamma=ex.uniform(1.15, 1.45), heel=ex.uniform(0.0, 0.08), heel_angle_deg=ex.uniform(0.0, 360.0),
        blur=ex.uniform(0.5, 1.0), grain=ex.uniform(0.012, 0.03),
    )


# ---------------------------------------------------------------------------------------------
# Shape functions, vectorised over canonical coordinate arrays. Margins are approximate signed
# distances in canonical units (positive inside), so soft edges have one width everywhere.


def _soft(margin, edge: float):
    return np.clip(margin * (1.0 / edge) + 0.5, 0.0, 1.0)


def _ellipse_margin(dx, dy, a: float, b: float, tilt_deg: float = 0.0):
    if tilt_deg:
        c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    u, v = dx * (1.0 / a), dy * (1.0 / b)
    gradient = 2.0 * np.sqrt((u * (1.0 / a)) ** 2 + (v * (1.0 / b)) ** 2) + 1e-6
    return (1.0 - u * u - v * v) / gradient


def _lung_outline_margin(anat: Anatomy, side: int, x, y):
    v = (y - anat.lung_cy) * (1.0 / anat.lung_ay)
    half = anat.lung_ax * np.maximum(1.0 + anat.lung_egg * v, 0.1)
    u = (x - side * anat.lung_cx) / half
    u2, v2, sq = u * u, v * v, anat.lung_squareness
    # Squircle u^2 + v^2 - sq u^2 v^2 = 1, its value divided by its gradient's length.
    gx = u * (1.0 - sq * v2) / half
    gy = v * (1.0 - sq * u2) * (1.0 / anat.lung_ay)
    return (1.0 - u2 - v2 + sq * u2 * v2) / (2.0 * np.sqrt(gx * gx + gy * gy) + 1e-6)


def _heart_margin(anat: Anatomy, x, y):
    return _ellipse_margin(x - anat.heart_x, y - anat.heart_y, anat.heart_a, anat.heart_b, anat.heart_tilt_deg)


def _lung_margin(anat: Anatomy, side: int, x, y):
    """Signed distance to one lung field: outline, diaphragm, mediastinum, heart and aortic knob."""
    margin = np.minimum(_lung_outline_margin(anat, side, x, y), side * x - anat.mediastinum_half_width)
    margin = np.minimum(margin, -_heart_margin(anat, x, y))
    margin = np.minimum(margin, _diaphragm_y(anat, side, x) - y)
    if side > 0:
        knob = np.sqrt((x - anat.knob_x) ** 2 + (y - anat.knob_y) ** 2) - anat.knob_r
        margin = np.minimum(margin, knob)
    return margin


def _lung_bbox(anat: Anatomy, side: int) -> tuple[float, float, float, float]:
    inner = side * (anat.mediastinum_half_width - 0.02)
    outer = side * (anat.thorax_half_width + 0.04)
    bottom = anat.dome(side)[1] + anat.diaphragm_drop + 0.04
    return min(inner, outer), anat.lung_top - 0.03, max(inner, outer), bottom


# ---------------------------------------------------------------------------------------------
# Landmarks


def _landmarks_canonical(anat: Anatomy) -> dict[str, tuple[float, float]]:
    eps = 0.01
    marks = {
        "carina": (anat.trachea_x, anat.carina_y),
        "right_lung_apex": (-anat.lung_cx, anat.lung_top),
        "left_lung_apex": (anat.lung_cx, anat.lung_top),
        "right_hilum": anat.hilum(-1),
        "left_hilum": anat.hilum(+1),
        "aortic_knob": (anat.knob_x, anat.knob_y),
    }
    reach = np.linspace(0.0, anat.thorax_half_width * 1.3, 1024)
    for side, name in ((-1, "right_costophrenic_angle"), (1, "left_costophrenic_angle")):
        # The lateral-most point where the lung still lies just above the diaphragm.
        x = side * reach
        y = _diaphragm_y(anat, side, x)
        i = int(np.flatnonzero(_lung_outline_margin(anat, side, x, y - eps) > 0)[-1])
        marks[name] = (float(x[i]), float(y[i]))
    # Cardiophrenic corners: where the heart (or, on the right, the mediastinum) meets each
    # hemidiaphragm. The heart is built to dip below the left dome, so a crossing always exists.
    x = reach
    y = _diaphragm_y(anat, +1, x)
    i = int(np.flatnonzero(_heart_margin(anat, x, y - eps) > 0)[-1])
    marks["cardiac_apex"] = (float(x[i]), float(y[i]))
    x = -reach
    y = _diaphragm_y(anat, -1, x)
    covered = (_heart_margin(anat, x, y - eps) > 0) | (reach < anat.mediastinum_half_width)
    i = int(np.flatnonzero(covered)[-1])
    marks["right_cardiophrenic_angle"] = (float(x[i]), float(y[i]))
    return {name: marks[name] for name in LANDMARKS}


# ---------------------------------------------------------------------------------------------
# Findings. Each kind has a `_place_*` function (its geometry, from its own generator) and a
# `_paint_*` function giving (attenuation change, extent) on coordinate arrays. The extent (0..1)
# gives the finding's box and, for a pneumothorax, where the lung markings vanish.


@dataclass(frozen=True)
class Finding:
    label: str
    side: int  # -1 right, +1 left, 0 midline
    bbox: tuple[float, float, float, float]  # canonical, generous: where painting happens
    params: dict


def _point_in_lung(anat: Anatomy, pose: Pose, draw: _Draw, side: int, clearance: float,
                   y_range: tuple[float, float] = (-1.0, 1.0)) -> tuple[float, float]:
    """A random canonical point at least `clearance` inside one lung and well inside the image."""
    x0, y0, x1, y1 = _lung_bbox(anat, side)
    y0, y1 = max(y0, y_range[0]), min(y1, y_range[1])
    x = draw.rng.uniform(x0, x1, 256)
    y = draw.rng.uniform(y0, y1, 256)
    xn, yn = pose.to_image(x, y)
    ok = np.flatnonzero((_lung_margin(anat, side, x, y) > clearance) & (np.abs(xn) < 0.95) & (np.abs(yn) < 0.95))
    if ok.size == 0:  # geometry guarantees room; reaching here means a bug in the anatomy ranges
        raise RuntimeError(f"no room for a finding of clearance {clearance} in lung side {side}")
    return float(x[ok[0]]), float(y[ok[0]])


def _square(x: float, y: float, half: float) -> tuple[float, float, float, float]:
    return x - half, y - half, x + half, y + half


def _place_nodule(anat, pose, draw):
    side = draw.side()
    radius = draw.uniform(0.018, 0.038)
    x, y = _point_in_lung(anat, pose, draw, side, radius * 1.2)
    params = {"x": x, "y": y, "r": radius, "density": draw.uniform(0.2, 0.34)}
    return [Finding("nodule", side, _square(x, y, radius * 1.3), params)]


def _paint_nodule(anat, f, x, y, edge):
    p = f.params
    d2 = ((x - p["x"]) ** 2 + (y - p["y"]) ** 2) * (1.0 / p["r"] ** 2)
    # A sphere's projected thickness: brightest in the middle, rounding off to the rim.
    ball = np.sqrt(np.clip(1.0 - d2, 0.0, None))
    extent = _soft((1.0 - np.sqrt(d2)) * p["r"], edge)
    return p["density"] * (0.75 * ball + 0.25 * extent), extent


def _place_mass(anat, pose, draw):
    side = draw.side()
    radius = draw.uniform(0.065, 0.11)
    x, y = _point_in_lung(anat, pose, draw, side, radius * 0.8)
    params = {
        "x": x, "y": y, "r": radius, "density": draw.uniform(0.24, 0.38),
        "lobes": [draw.uniform(0.06, 0.14), draw.uniform(0.0, 2 * math.pi), draw.uniform(0.03, 0.08),
                  draw.uniform(0.0, 2 * math.pi)],
    }
    return [Finding("mass", side, _square(x, y, radius * 1.35), params)]


def _paint_mass(anat, f, x, y, edge):
    p = f.params
    a1, p1, a2, p2 = p["lobes"]
    dx, dy = x - p["x"], y - p["y"]
    theta = np.arctan2(dy, dx)
    radius = p["r"] * (1.0 + a1 * np.sin(3.0 * theta + p1) + a2 * np.sin(5.0 * theta + p2))
    d = np.sqrt(dx * dx + dy * dy) / radius
    extent = _soft((1.0 - d) * radius, edge * 1.5)  # lobulated, slightly fuzzy margin
    core = np.sqrt(np.clip(1.0 - d * d, 0.0, None))
    return p["density"] * (0.55 * core + 0.45 * extent), extent


def _place_consolidation(anat, pose, draw):
    side = draw.side()
    hilum_y = anat.hilum(side)[1]
    y_range = (anat.lung_top + 0.12, hilum_y) if draw.rng.random() < 0.4 else (hilum_y, 1.0)
    cx, cy = _point_in_lung(anat, pose, draw, side, 0.05, y_range)
    size = draw.uniform(0.1, 0.18)
    blobs = [
        (cx + draw.normal(0.0, size * 0.55), cy + draw.normal(0.0, size * 0.45), draw.uniform(0.35, 0.6) * size)
        for _ in range(int(draw.rng.integers(5, 9)))
    ]
    params = {"blobs": blobs, "density": draw.uniform(0.24, 0.36),
              "texture": [draw.uniform(0, 2 * math.pi), draw.uniform(0, 2 * math.pi)]}
    bbox = (min(bx - 2.2 * br for bx, _, br in blobs), min(by - 2.2 * br for _, by, br in blobs),
            max(bx + 2.2 * br for bx, _, br in blobs), max(by + 2.2 * br for _, by, br in blobs))
    return [Finding("consolidation", side, bbox, params)]


def _paint_consolidation(anat, f, x, y, edge):
    p = f.params
    field_ = 0.0
    for bx, by, br in p["blobs"]:
        field_ = field_ + np.exp(((x - bx) ** 2 + (y - by) ** 2) * (-1.0 / (br * br)))
    # Metaballs cut into a patchy opacity, mottled, and confined to the lung it fills.
    opacity = np.clip((field_ - 0.35) * (1.0 / 0.6), 0.0, 1.0)
    t1, t2 = p["texture"]
    mottle = 0.8 + 0.2 * np.sin(61.0 * x + t1) * np.sin(53.0 * y + t2)
    inside = _soft(_lung_margin(anat, f.side, x, y), edge)
    return p["density"] * opacity * mottle * inside, (opacity > 0.05) * inside


def _place_effusion(anat, pose, draw):
    sides = (-1, 1) if draw.rng.random() < 0.2 else (draw.side(),)
    findings = []
    for side in sides:
        params = {"fill": draw.uniform(0.4, 2.0), "meniscus": draw.uniform(0.08, 0.18),
                  "density": draw.uniform(0.38, 0.5)}
        x0, _, x1, y1 = _lung_bbox(anat, side)
        top = anat.dome(side)[1] + anat.diaphragm_drop * (1.0 - params["fill"]) - params["meniscus"] * 1.3**3
        findings.append(Finding("effusion", side, (x0, top - 0.03, x1, y1), params))
    return findings


def _paint_effusion(anat, f, x, y, edge):
    p = f.params
    side = f.side
    dome_x, _ = anat.dome(side)
    half = anat.thorax_half_width - abs(dome_x)
    # Fluid fills the costophrenic recess first; more of it covers the dome. It climbs the
    # lateral chest wall in a concave meniscus and hides the hemidiaphragm beneath it.
    level = anat.dome(side)[1] + anat.diaphragm_drop * (1.0 - p["fill"])
    lateral = np.clip((x - dome_x) * (side / half), 0.0, 1.3)
    depth = y - (level - p["meniscus"] * lateral * lateral * lateral)
    fluid = _soft(depth, edge * 3.0) * _soft(_lung_margin(anat, side, x, y), edge * 1.5)
    return p["density"] * (0.7 + 0.3 * np.clip(depth * (1.0 / 0.08), 0.0, 1.0)) * fluid, fluid


def _place_pneumothorax(anat, pose, draw):
    side = draw.side()
    params = {"depth": draw.uniform(0.045, 0.11), "reach": draw.uniform(0.35, 0.65)}
    return [Finding("pneumothorax", side, _lung_bbox(anat, side), params)]


def _paint_pneumothorax(anat, f, x, y, edge):
    p = f.params
    side, depth = f.side, p["depth"]
    # The collapsed lung keeps its medial and basal attachments and pulls away from the apex and
    # the lateral chest wall, leaving a dark rim without vessels, bounded by the thin bright
    # visceral pleural line.
    collapsed = replace(
        anat, lung_cx=anat.lung_cx - 0.6 * depth, lung_ax=anat.lung_ax - 0.6 * depth,
        lung_cy=anat.lung_cy + 0.8 * depth, lung_ay=anat.lung_ay - 0.8 * depth, lung_top=anat.lung_top + 1.6 * depth,
    )
    pleura = _lung_outline_margin(collapsed, side, x, y)
    lung = _lung_margin(anat, side, x, y)
    upper = _soft(anat.lung_top + p["reach"] * 2.0 * anat.lung_ay - y, 0.08)
    rim = _soft(-pleura, edge) * _soft(lung, edge) * upper
    line = np.clip(1.0 - np.abs(pleura) * (1.0 / (1.2 * edge)), 0.0, 1.0) * _soft(lung - edge, edge) * upper
    return 0.16 * line - 0.1 * rim, rim


def _place_atelectasis(anat, pose, draw):
    side = draw.side()
    dome_y = anat.dome(side)[1]
    x, y = _point_in_lung(anat, pose, draw, side, 0.04, (dome_y - 0.32, dome_y + 0.1))
    params = {"x": x, "y": y, "half_length": draw.uniform(0.06, 0.12), "half_thickness": draw.uniform(0.009, 0.016),
              "angle_deg": draw.uniform(-15.0, 15.0), "density": draw.uniform(0.2, 0.3)}
    return [Finding("atelectasis", side, _square(x, y, params["half_length"] + 0.03), params)]


def _paint_atelectasis(anat, f, x, y, edge):
    p = f.params
    c, s = math.cos(math.radians(p["angle_deg"])), math.sin(math.radians(p["angle_deg"]))
    along = c * (x - p["x"]) + s * (y - p["y"])
    across = -s * (x - p["x"]) + c * (y - p["y"])
    # Plate-like atelectasis: a thin band, tapering to both ends.
    thickness = p["half_thickness"] * np.sqrt(np.clip(1.0 - (along * (1.0 / p["half_length"])) ** 2, 0.0, None))
    band = _soft(thickness - np.abs(across), edge) * _soft(_lung_margin(anat, f.side, x, y), edge)
    return p["density"] * band, band


def _place_cardiomegaly(anat, pose, draw):
    return [Finding("cardiomegaly", 0, _square(anat.heart_x, anat.heart_y, anat.heart_a + 0.02), {})]


def _paint_cardiomegaly(anat, f, x, y, edge):
    # The enlargement is built into the anatomy; the finding's extent is the heart shadow above
    # the diaphragm.
    floor = np.where(x < 0, _diaphragm_y(anat, -1, x), _diaphragm_y(anat, 1, x))
    extent = _soft(_heart_margin(anat, x, y), edge) * _soft(floor - y, edge)
    return np.zeros_like(extent), extent


_FINDINGS = {
    "atelectasis": (_place_atelectasis, _paint_atelectasis),
    "cardiomegaly": (_place_cardiomegaly, _paint_cardiomegaly),
    "consolidation": (_place_consolidation, _paint_consolidation),
    "effusion": (_place_effusion, _paint_effusion),
    "mass": (_place_mass, _paint_mass),
    "nodule": (_place_nodule, _paint_nodule),
    "pneumothorax": (_place_pneumothorax, _paint_pneumothorax),
}
assert set(_FINDINGS) == set(DISEASES)


# ---------------------------------------------------------------------------------------------
# A planned case: everything but the pixels


@dataclass(frozen=True)
class _Plan:
    image_id: str
    patient_id: str
    study: int
    anatomy: Anatomy
    pose: Pose
    exposure: Exposure
    labels: dict[str, int]
    findings: tuple[Finding, ...]
    texture: _Texture


def _plan(image_id: str, seed: int, config: PhantomConfig) -> _Plan:
    patient_id, study = _parse_image_id(image_id)
    # One uniform per disease, always drawn, so one disease's prevalence never moves another's.
    draws = _rng(seed, "labels", patient_id, study).random(len(DISEASES))
    labels = {d: int(u < config.prevalence[d]) for d, u in zip(DISEASES, draws)}
    ctr_target = _Draw(seed, "cardiomegaly", patient_id, study).uniform(0.54, 0.65) if labels["cardiomegaly"] else None
    anat, pose = _sample_anatomy(seed, patient_id, study, ctr_target)
    findings: list[Finding] = []
    for disease in DISEASES:
        if labels[disease]:
            place, _ = _FINDINGS[disease]
            findings += place(anat, pose, _Draw(seed, "finding", disease, patient_id, study))
    exposure = _sample_exposure(seed, patient_id, study)
    texture = _sample_texture(seed, patient_id, study)
    return _Plan(image_id, patient_id, study, anat, pose, exposure, labels, tuple(findings), texture)


def _edge(size: int, pose: Pose, px: float = 1.2) -> float:
    """Soft-edge width in canonical units spanning about `px` image pixels."""
    return px * 2.0 / size / pose.scale


def _finding_box(plan: _Plan, finding: Finding, size: int) -> Box:
    """The pixel box around where a finding's extent passes one half, measured on a fine grid.

    Structures thinner than the soft edge (a plate at a tiny image size) never reach one half;
    they are boxed where they reach half their own peak.
    """
    _, paint = _FINDINGS[finding.label]
    x0, y0, x1, y1 = finding.bbox
    pixel = 2.0 / size / plan.pose.scale
    nx = int(np.clip((x1 - x0) / pixel * 2.0, 8, 160))
    ny = int(np.clip((y1 - y0) / pixel * 2.0, 8, 160))
    gx = np.linspace(x0, x1, nx, dtype=np.float32)[None, :]
    gy = np.linspace(y0, y1, ny, dtype=np.float32)[:, None]
    _, extent = paint(plan.anatomy, finding, gx, gy, _edge(size, plan.pose))
    extent = np.broadcast_to(extent, (ny, nx))
    rows, cols = np.nonzero(extent >= min(0.5, 0.5 * float(extent.max())) + 1e-6)
    px, py = plan.pose.to_pixels(gx[0, cols].astype(float), gy[rows, 0].astype(float), size)
    visible = (px > 0) & (px < size) & (py > 0) & (py < size)
    if not visible.any():
        raise RuntimeError(f"phantom {plan.image_id}: the {finding.label} has no visible extent")
    px, py = px[visible], py[visible]
    pad = 0.5 * max((x1 - x0) / nx, (y1 - y0) / ny) / pixel + 0.5  # half a grid step, in pixels
    return Box(
        finding.label,
        float(max(px.min() - pad, 0.0)), float(max(py.min() - pad, 0.0)),
        float(min(px.max() + pad, size)), float(min(py.max() + pad, size)),
    )


def _describe(plan: _Plan, seed: int, config: PhantomConfig) -> CaseDescription:
    size = config.size
    landmarks = {}
    for name, (x, y) in _landmarks_canonical(plan.anatomy).items():
        px, py = plan.pose.to_pixels(x, y, size)
        landmarks[name] = (float(px), float(py))
    anatomy = {**asdict(plan.anatomy), **{f"pose_{k}": v for k, v in asdict(plan.pose).items()}}
    fractions = tuple(config.split_fractions[s] for s in SPLITS)
    return CaseDescription(
        image_id=plan.image_id,
        patient_id=plan.patient_id,
        study=plan.study,
        split=patient_split("phantom", plan.patient_id, seed, fractions),
        view="PA",
        labels=dict(plan.labels),
        boxes=[_finding_box(plan, f, size) for f in plan.findings],
        landmarks=landmarks,
        anatomy={k: float(v) for k, v in anatomy.items()},
    )


def describe_case(image_id: str, seed: int, config: PhantomConfig | None = None) -> CaseDescription:
    """Labels, boxes, landmarks and anatomy of a case, without rendering its pixels."""
    config = config or PhantomConfig()
    return _describe(_plan(image_id, seed, config), seed, config)


def generate_case(image_id: str, seed: int, config: PhantomConfig | None = None) -> PhantomCase:
    """One phantom radiograph and its annotations: the same bytes for the same inputs, anywhere."""
    config = config or PhantomConfig()
    plan = _plan(image_id, seed, config)
    description = _describe(plan, seed, config)
    image = _render(plan, seed, config)
    return PhantomCase(**{f.name: getattr(description, f.name) for f in fields(description)}, image=image)


def render_masks(image_id: str, seed: int, config: PhantomConfig | None = None) -> dict[str, np.ndarray]:
    """(size, size) bool masks of a case: every class of `MASK_CLASSES` (empty where absent).

    They come from the shapes that paint the image. A finding's mask is where its extent (the
    function that paints it and measures its box) reaches the level its box is measured at, within
    the window it is painted in; a lung is where the painted lung field's signed distance is
    positive; the heart is the heart shadow above the diaphragm, which is also cardiomegaly's extent.
    """
    config = config or PhantomConfig()
    plan = _plan(image_id, seed, config)
    size = config.size
    strip = _Strip(size, plan.pose, 0, size)
    masks = {name: np.zeros((size, size), dtype=bool) for name in MASK_CLASSES}
    for finding, win, _, extent in _painted_findings(strip, plan):
        extent = np.broadcast_to(extent, strip.x[win].shape)
        masks[finding.label][win] |= extent >= min(0.5, 0.5 * float(extent.max())) + 1e-6
    for side, name in ((-1, "right_lung"), (1, "left_lung")):
        masks[name] = _lung_margin(plan.anatomy, side, strip.x, strip.y) > 0
    heart = Finding("cardiomegaly", 0, (-1.0, -1.0, 1.0, 1.0), {})
    masks["heart"] = _paint_cardiomegaly(plan.anatomy, heart, strip.x, strip.y, strip.edge)[1] >= 0.5
    return masks


# ---------------------------------------------------------------------------------------------
# Rendering. The image is painted in horizontal strips of about 64k pixels: every temporary
# array then stays in the CPU cache, which makes numpy several times faster than whole-image
# passes. Painters are pure functions of the plan, so strips never disagree at their seams.


# Vessel tiers, thick to thin: (lines round the hilum, start and end radius, width, strength).
_VESSEL_TIERS = ((10, 0.0, 0.5, 0.035, 0.2), (24, 0.08, 0.65, 0.02, 0.12), (55, 0.2, 0.75, 0.011, 0.07))


@dataclass(frozen=True)
class _Texture:
    """Random detail that only affects pixels, per side (right, left)."""

    vessel_noise: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]  # per tier: values round the hilum
    vessel_phases: tuple[tuple[float, ...], tuple[float, ...]]
    hilar_blobs: tuple[tuple[tuple[float, float, float], ...], tuple[tuple[float, float, float], ...]]


def _sample_texture(seed: int, patient_id: str, study: int) -> _Texture:
    draw = _Draw(seed, "texture", patient_id, study)
    noise = tuple(
        tuple(draw.rng.random(2 * count).astype(np.float32) for count, *_ in _VESSEL_TIERS) for _side in (0, 1)
    )
    phases = tuple(tuple(draw.uniform(0.0, 2.0 * math.pi) for _ in range(3 * len(_VESSEL_TIERS))) for _side in (0, 1))
    blobs = tuple(
        tuple((draw.uniform(-0.01, 0.05), draw.uniform(-0.05, 0.05), draw.uniform(0.018, 0.03)) for _ in range(4))
        for _side in (0, 1)
    )
    return _Texture(noise, phases, blobs)


@lru_cache(maxsize=8)
def _pixel_axis(size: int) -> np.ndarray:
    axis = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    axis.setflags(write=False)
    return axis


class _Strip:
    """Rows [r0, r1) of the attenuation map, with the canonical coordinates of their pixels."""

    def __init__(self, size: int, pose: Pose, r0: int, r1: int):
        self.size, self.pose, self.r0, self.r1 = size, pose, r0, r1
        axis = _pixel_axis(size)
        x, y = pose.to_canonical(axis[None, :], axis[r0:r1, None])
        self.x, self.y = x.astype(np.float32), y.astype(np.float32)
        self.attenuation = np.zeros((r1 - r0, size), np.float32)
        self.markings = np.zeros((r1 - r0, size), np.float32)
        self.edge = _edge(size, pose)

    def window(self, bbox) -> tuple[slice, slice] | None:
        """Strip-relative slices covering a canonical box (after rotation), or None if it misses."""
        x0, y0, x1, y1 = bbox
        px, py = self.pose.to_pixels(np.array([x0, x1, x0, x1]), np.array([y0, y0, y1, y1]), self.size)
        c0, c1 = max(int(px.min()) - 2, 0), min(int(px.max()) + 2, self.size)
        r0, r1 = max(int(py.min()) - 2, self.r0), min(int(py.max()) + 2, self.r1)
        if r1 <= r0 or c1 <= c0:
            return None
        return slice(r0 - self.r0, r1 - self.r0), slice(c0, c1)


def _paint_body(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    x, y = strip.x, strip.y
    ax = np.abs(x) * (1.0 / anat.body_half_width)
    # Soft tissue, thickest in the middle; neck and shoulders slope off at the top of the film.
    inside = _soft(1.0 - ax, 0.03) * _soft(y + 1.12 - 0.3 * ax * ax, 0.04)
    strip.attenuation += inside * (0.25 + 0.65 * np.sqrt(np.clip(1.0 - ax * ax, 0.0, None)))


def _paint_lungs(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    for side in (-1, 1):
        win = strip.window(_lung_bbox(anat, side))
        if win is None:
            continue
        x, y = strip.x[win], strip.y[win]
        margin = _lung_margin(anat, side, x, y)
        lung = _soft(margin, strip.edge * 1.5)
        # More air where the lung is deeper, less at the bases under the domes and breasts.
        depth = np.clip(margin * (1.0 / 0.15), 0.0, 1.0)
        base = np.clip((y - anat.hilum(side)[1]) * 1.5, 0.0, 0.6)
        markings = _vessels(anat, side, x, y, texture.vessel_noise[side > 0], texture.vessel_phases[side > 0]) * lung
        strip.markings[win] = markings
        strip.attenuation[win] += markings - lung * (0.4 + 0.28 * depth - 0.1 * base)


def _vessels(anat: Anatomy, side: int, x, y, noise: tuple[np.ndarray, ...], phases: tuple[float, ...]):
    """Pulmonary vessels: meandering, tapering shadows fanning out from the hilum.

    Each tier draws lines where a smooth random function of the (meandering) angle round the
    hilum crosses one half: irregularly spaced, roughly radial, never closed loops. Thinner
    tiers start further out and break into dashes, as branches do when they leave the plane.
    """
    hx, hy = anat.hilum(side)
    dx, dy = (x - hx) * side, y - hy
    r = np.sqrt(dx * dx + dy * dy) + 1e-4
    theta = np.arctan2(dy, dx)
    total = 0.0
    for i, ((count, start, reach, width, strength), table) in enumerate(zip(_VESSEL_TIERS, noise)):
        p1, p2, p3 = phases[3 * i: 3 * i + 3]
        cells = table.size / (2.0 * math.pi)
        u = theta * cells + 0.5 * np.sin(7.0 * r + p1) + 0.3 * np.sin(3.0 * theta + 11.0 * r + p2)
        value = _periodic_noise(table, u)
        taper = np.clip(1.0 - r * (1.0 / reach), 0.0, None)
        half = (0.35 * width * cells) * taper / r  # half-width, in noise units near a crossing
        line = np.clip(1.0 - np.abs(value - 0.5) / (half + 1e-6), 0.0, 1.0)
        if start:
            line *= np.clip((r - start) * (1.0 / start), 0.0, 1.0)
            line *= np.clip(1.5 * np.sin(2.3 * u + 23.0 * r + p3) + 0.8, 0.0, 1.0)
        total = total + strength * line * (2.0 - line)  # a rounded profile across the vessel
    return total


def _periodic_noise(table: np.ndarray, u):
    """Smoothly interpolated random values, one per unit of u, wrapping round the table."""
    iu = np.floor(u)
    f = u - iu
    f = f * f * (3.0 - 2.0 * f)
    i0 = iu.astype(np.int32) % table.size
    a, b = table[i0], table[(i0 + 1) % table.size]
    return a + f * (b - a)


def _paint_hila(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    for side in (-1, 1):
        hx, hy = anat.hilum(side)
        win = strip.window(_square(hx, hy, 0.12))
        if win is None:
            continue
        x, y = strip.x[win], strip.y[win]
        # The pulmonary artery and its first branches: a lobulated density at the lung root.
        density = 0.0
        for bx, by, s in texture.hilar_blobs[side > 0]:
            density = density + np.exp(((x - hx - side * bx) ** 2 + (y - hy - by) ** 2) * (-1.0 / (s * s)))
        strip.attenuation[win] += 0.12 * np.minimum(density, 1.5)


def _paint_mediastinum(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    e = strip.edge
    win = strip.window(_square(anat.heart_x, anat.heart_y, anat.heart_a + 0.03))
    if win is not None:
        x, y = strip.x[win], strip.y[win]
        strip.attenuation[win] += 0.08 * _soft(_heart_margin(anat, x, y), e * 2.0)
    win = strip.window(_square(anat.knob_x, anat.knob_y, anat.knob_r + 0.02))
    if win is not None:
        x, y = strip.x[win], strip.y[win]
        knob = anat.knob_r - np.sqrt((x - anat.knob_x) ** 2 + (y - anat.knob_y) ** 2)
        strip.attenuation[win] += 0.05 * _soft(knob, e * 1.5)
    # Trachea and main bronchi: air columns through the mediastinum.
    win = strip.window((-0.45, -1.2, 0.45, anat.carina_y + 0.25))
    if win is not None:
        x, y = strip.x[win], strip.y[win]
        tw, cx, cy = anat.trachea_half_width, anat.trachea_x, anat.carina_y
        air = _soft(tw - np.abs(x - cx), e * 1.5) * _soft(cy - y, e)
        for side, length in ((-1, 0.6), (1, 0.75)):
            hx, hy = anat.hilum(side)
            bx, by = cx + length * (hx - cx), cy + length * (hy - cy)
            air = np.maximum(air, _soft(0.8 * tw - _segment_distance(x, y, cx, cy, bx, by), e * 1.5))
        strip.attenuation[win] -= 0.14 * air


def _segment_distance(x, y, ax: float, ay: float, bx: float, by: float):
    vx, vy = bx - ax, by - ay
    t = np.clip(((x - ax) * vx + (y - ay) * vy) * (1.0 / (vx * vx + vy * vy)), 0.0, 1.0)
    return np.sqrt((x - ax - t * vx) ** 2 + (y - ay - t * vy) ** 2)


def _paint_spine(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    sw = anat.spine_half_width
    win = strip.window((-sw * 1.5, -1.3, sw * 1.5, 1.3))
    if win is None:
        return
    x, y = strip.x[win], strip.y[win]
    column = _soft(sw - np.abs(x), strip.edge * 2.0)
    phase = (y - anat.vertebra_phase * anat.vertebra_height) * (1.0 / anat.vertebra_height)
    f = phase - np.floor(phase)
    # Vertebral bodies between darker discs; the paired pedicles show as small rings.
    body = _soft(np.minimum(f - 0.12, 0.98 - f) * anat.vertebra_height, strip.edge)
    ring = ((np.abs(x) - 0.62 * sw) * (1.0 / (0.22 * sw))) ** 2 + ((f - 0.45) * (1.0 / 0.22)) ** 2
    pedicle = np.clip(1.0 - np.abs(ring - 1.0) * (1.0 / 0.45), 0.0, 1.0)
    strip.attenuation[win] += column * (0.04 + 0.05 * body + 0.05 * pedicle)


def _paint_ribs(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    T = anat.thorax_half_width
    win = strip.window((-T * 1.25, -1.1, T * 1.25, anat.dome_y_left + anat.diaphragm_drop + 0.1))
    if win is None:
        return
    x, y = strip.x[win], strip.y[win]
    xs = np.abs(x) * (1.0 / T)
    xs2 = xs * xs
    span = _soft(1.08 - xs, 0.05) * _soft(xs - 0.08, 0.04)
    # Posterior ribs rise a little from the spine, then sweep down the lateral chest wall. Rib k
    # starts at first_y + k * spacing + growth * k^2, so the lower interspaces are wider.
    yr = y - anat.rib_curve * (xs2 * xs2 - 0.36 * xs)
    s, q = anat.rib_spacing, anat.rib_growth
    k = (np.sqrt(np.clip(s * s + 4.0 * q * (yr - anat.rib_first_y), 0.0, None)) - s) * (1.0 / (2.0 * q))
    posterior = _rib_profile(k, anat.rib_width, 11)
    # Anterior ribs: fainter, running down and inwards from the lateral wall.
    ka = (y - 0.3 * (1.0 - xs) ** 2 - (anat.rib_first_y + 0.2)) * (1.0 / (s * 1.1))
    anterior = _rib_profile(ka, 0.33, 7) * _soft(xs - 0.3, 0.1)
    strip.attenuation[win] += (0.13 * posterior + 0.05 * anterior) * span


def _rib_profile(k, width: float, count: int):
    index = np.floor(k)
    t = (k - index) * (2.0 / width) - 1.0  # -1..1 across a rib
    # A bony tube: its cortex makes the edges brighter than the middle.
    tube = np.sqrt(np.clip(1.0 - t * t, 0.0, None)) * (0.55 + 0.45 * t * t)
    return tube * ((index >= 0) & (index < count))


def _paint_clavicles(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    win = strip.window((-0.75, anat.clavicle_y - 0.12, 0.75, anat.clavicle_y + 0.12))
    if win is None:
        return
    x, y = strip.x[win], strip.y[win]
    run = (np.abs(x) - 0.06) * (1.0 / 0.55)
    centre = anat.clavicle_y + anat.clavicle_slope * run + 0.03 * np.sin(np.clip(run, 0.0, 1.0) * 5.0)
    thickness = 0.022 + 0.01 * np.clip(1.0 - run * 3.0, 0.0, 1.0)  # the medial end is stouter
    across = (y - centre) / thickness
    ends = _soft(run, 0.02) * _soft(1.0 - run, 0.05)
    clavicle = np.sqrt(np.clip(1.0 - across * across, 0.0, None)) * (0.6 + 0.4 * across * across)
    strip.attenuation[win] += 0.18 * clavicle * ends


def _paint_abdomen(strip: _Strip, anat: Anatomy, texture: _Texture) -> None:
    # Gastric air bubble under the left hemidiaphragm, with a flat fluid level.
    cx, cy = anat.dome_x_left + 0.04, anat.dome_y_left + 0.07
    win = strip.window((cx - 0.12, cy - 0.08, cx + 0.12, cy + 0.08))
    if win is None:
        return
    x, y = strip.x[win], strip.y[win]
    bubble = _soft(_ellipse_margin(x - cx, y - cy, 0.08, 0.045), strip.edge * 2) * _soft(cy + 0.012 - y, strip.edge)
    strip.attenuation[win] -= 0.2 * bubble


_PAINTERS = (
    _paint_body, _paint_lungs, _paint_hila, _paint_mediastinum, _paint_spine, _paint_ribs,
    _paint_clavicles, _paint_abdomen,
)


def _painted_findings(strip: _Strip, plan: _Plan):
    """(finding, window, attenuation delta, extent) for each finding that reaches the strip."""
    for finding in plan.findings:
        win = strip.window(finding.bbox)
        if win is None:
            continue
        _, paint = _FINDINGS[finding.label]
        delta, extent = paint(plan.anatomy, finding, strip.x[win], strip.y[win], strip.edge)
        yield finding, win, delta, extent


def _paint_findings(strip: _Strip, plan: _Plan) -> None:
    for finding, win, delta, extent in _painted_findings(strip, plan):
        strip.attenuation[win] += delta
        if finding.label == "pneumothorax":  # no lung markings beyond the pleural line
            strip.attenuation[win] -= strip.markings[win] * extent


def _blur(img: np.ndarray, strength: float) -> np.ndarray:
    """A [1, 2, 1] / 4 binomial blur along both axes (sigma 0.7 px), mixed in by `strength`."""
    out = img.copy()
    out[:, 1:-1] += 0.5 * strength * (0.5 * (img[:, :-2] + img[:, 2:]) - img[:, 1:-1])
    src = out.copy()
    out[1:-1] += 0.5 * strength * (0.5 * (src[:-2] + src[2:]) - src[1:-1])
    return out


_LUT_RANGE = (-0.3, 2.0)


def _expose(attenuation: np.ndarray, exposure: Exposure, draw: _Draw, bits: int) -> np.ndarray:
    size = attenuation.shape[0]
    # Film curve, contrast, brightness and gamma folded into one lookup table over attenuation.
    lo, hi = _LUT_RANGE
    levels = np.linspace(lo, hi, 4096)
    curve = (1.0 - np.exp(-exposure.gain * np.maximum(levels, 0.0))) / (1.0 - math.exp(-exposure.gain * 1.8))
    curve = np.clip(curve * exposure.contrast + exposure.brightness, 0.0, 1.0) ** exposure.gamma
    index = np.clip((attenuation - lo) * (4095.0 / (hi - lo)), 0, 4095).astype(np.int32)
    img = np.take(curve.astype(np.float32), index)
    heel = math.radians(exposure.heel_angle_deg)
    axis = _pixel_axis(size)
    img *= (1.0 + exposure.heel * math.cos(heel) * axis)[None, :]
    img *= (1.0 + exposure.heel * math.sin(heel) * axis)[:, None]
    img = _blur(img, exposure.blur)
    # Quantum mottle: grain growing with the square root of the signal. Uniform noise of the
    # same variance as Gaussian looks the same after display and costs a fifth of the time.
    grain = draw.rng.random((size, size), dtype=np.float32) - 0.5
    img += (exposure.grain * math.sqrt(12.0)) * np.sqrt(img + 0.02) * grain
    top = 255.0 if bits == 8 else 4095.0
    out = np.clip(img * top + 0.5, 0.0, top)
    return out.astype(np.uint8 if bits == 8 else np.uint16)


def _render(plan: _Plan, seed: int, config: PhantomConfig) -> np.ndarray:
    size = config.size
    attenuation = np.empty((size, size), np.float32)
    rows = max(16, 65536 // size)
    for r0 in range(0, size, rows):
        strip = _Strip(size, plan.pose, r0, min(r0 + rows, size))
        for paint in _PAINTERS:
            paint(strip, plan.anatomy, plan.texture)
        _paint_findings(strip, plan)
        attenuation[strip.r0:strip.r1] = strip.attenuation
    return _expose(attenuation, plan.exposure, _Draw(seed, "grain", plan.patient_id, plan.study), config.bits)


# ---------------------------------------------------------------------------------------------
# A picture for the README


def render_sample_grid(path: str | Path, n: int = 12, seed: int = 0, config: PhantomConfig | None = None) -> None:
    """Write a PNG grid of the first n cases with their boxes and landmarks drawn on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from leader.io import atomic_write_bytes

    config = config or PhantomConfig(size=256)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.25 * rows + 0.6), squeeze=False)
    landmark_colors = plt.get_cmap("tab10")
    disease_colors = dict(zip(DISEASES, ("#ff7f0e", "#d62728", "#e377c2", "#17becf", "#bcbd22", "#2ca02c", "#9467bd")))
    for ax, (image_id, _, _) in zip(axes.flat, phantom_index(n, seed, config)):
        case = generate_case(image_id, seed, config)
        top = 255 if config.bits == 8 else 4095
        ax.imshow(case.image, cmap="gray", vmin=0, vmax=top, interpolation="bilinear")
        for box in case.boxes:
            color = disease_colors[box.label]
            ax.add_patch(Rectangle((box.x0, box.y0), box.x1 - box.x0, box.y1 - box.y0, fill=False, lw=1.2, ec=color))
            ax.text(box.x0 + 2, box.y0 - 2, box.label, color=color, fontsize=6.5, va="bottom")
        for i, (x, y) in enumerate(case.landmarks.values()):
            ax.plot(x, y, "o", ms=3.0, mfc=landmark_colors(i), mec="black", mew=0.4)
        findings = ", ".join(d for d, v in case.labels.items() if v) or "normal"
        ax.set_title(f"{image_id} ({case.split})\n{findings}", fontsize=7.5)
        ax.set_axis_off()
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    handles = [plt.Line2D([], [], ls="", marker="o", ms=4, mfc=landmark_colors(i), mec="black", mew=0.4, label=name)
               for i, name in enumerate(LANDMARKS)]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
