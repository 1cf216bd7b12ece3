"""phantom: the procedural chest radiographs that `leader demo` runs on (leader.shards.phantom).

No files are read: `--root` is ignored and `n` (default 1000) sets the number of images. Labels,
boxes, landmarks and patient-wise splits come from the generator's geometry at once; pixels and
masks (every finding class, then right_lung, left_lung and heart) are rendered later, by `load`
and `masks`, in the builder's worker processes. `load` is a partial of a
module-level function of (image id, seed, config), so it pickles and regenerates the same bytes
in any process.

A case without any finding is healthy (the generator knows it drew none); boxes and landmarks are
given on the ``size`` x ``size`` image the generator renders.

Options (adapter keyword arguments, e.g. from the build settings): any `PhantomConfig` field,
such as ``size``, ``bits``, ``prevalence`` (a dict of rates; unlisted diseases keep theirs),
``studies_per_patient`` and ``split_fractions``.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Iterator

import numpy as np

from leader.errors import LeaderError
from leader.shards.datasets import register_dataset
from leader.shards.masks import ClassMasks
from leader.shards.phantom import (
    DISEASES,
    LANDMARKS,
    MASK_CLASSES,
    PhantomConfig,
    describe_case,
    generate_case,
    phantom_index,
    render_masks,
)
from leader.shards.records import RejectLog, SourceRecord

DEFAULT_N = 1000


def render_phantom_image(image_id: str, seed: int, config: PhantomConfig) -> np.ndarray:
    return generate_case(image_id, seed, config).image


def phantom_masks(image_id: str, seed: int, config: PhantomConfig, height: int, width: int) -> ClassMasks:
    return ClassMasks(MASK_CLASSES, render_masks(image_id, seed, config))


@register_dataset("phantom")
class PhantomDataset:
    """Procedural PA chest radiographs with findings, boxes, landmarks and patients."""

    name = "phantom"
    label_names = list(DISEASES)
    landmark_names = list(LANDMARKS)
    mask_classes = list(MASK_CLASSES)
    has_boxes = True
    has_landmarks = True
    overlap_note = None

    def __init__(self, config: PhantomConfig | None = None, **overrides):
        config = config or PhantomConfig()
        known = {f.name for f in dataclasses.fields(PhantomConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise LeaderError(f"phantom: unknown option(s) {unknown}; known: {sorted(known)}")
        if "studies_per_patient" in overrides:
            overrides["studies_per_patient"] = tuple(overrides["studies_per_patient"])
        self.config = dataclasses.replace(config, **overrides)

    def records(self, root: Path | None, rejects: RejectLog, *, seed: int, n: int | None) -> Iterator[SourceRecord]:
        count = DEFAULT_N if n is None else n
        for image_id, _, _ in phantom_index(count, seed, self.config):
            case = describe_case(image_id, seed, self.config)
            yield SourceRecord(
                dataset=self.name,
                image_id=image_id,
                path="",
                load=functools.partial(render_phantom_image, image_id, seed, self.config),
                patient_id=case.patient_id,
                split=case.split,
                labels=dict(case.labels),
                source_labels=dict(case.labels),
                boxes=case.boxes,
                landmarks=case.landmarks,
                view=case.view,
                extra={"study": case.study, "anatomy": case.anatomy},
                healthy=not any(case.labels.values()),
                frame=(self.config.size, self.config.size),
                masks=functools.partial(phantom_masks, image_id, seed, self.config),
            )
