"""crop_patch: one way to cut a patch, the same in numpy and in a torch batch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from leader.errors import LeaderError
from leader.shards.crop import crop_patch
from leader.shards.records import Box


@pytest.fixture
def image() -> np.ndarray:
    """A 64x64 uint16 image with no symmetry, so any misplaced pixel shows."""
    return np.random.default_rng(0).integers(0, 65536, (64, 64)).astype(np.uint16)


@pytest.mark.parametrize("dtype, white", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0)])
def test_the_full_box_at_its_own_size_reproduces_the_image(dtype, white):
    img = (np.random.default_rng(1).random((48, 48)) * white).astype(dtype)
    patch = crop_patch(img, [0, 0, 48, 48], 48)
    assert patch.dtype == np.float32 and patch.shape == (48, 48)
    np.testing.assert_allclose(patch, img / white, atol=1e-5)


def test_a_sub_square_at_its_own_size_is_a_slice(image):
    patch = crop_patch(image, [8, 16, 40, 48], 32)       # x0, y0, x1, y1
    np.testing.assert_allclose(patch, image[16:48, 8:40] / 65535, atol=1e-5)


def test_a_sub_square_after_shrinking_matches_the_shrunk_image(image):
    half = crop_patch(image, [0, 0, 64, 64], 32)
    quarter = crop_patch(image, [16, 16, 48, 48], 16)
    # The same sample lattice and the same filter; only the outer ring sees a different border.
    np.testing.assert_allclose(quarter[1:-1, 1:-1], half[9:23, 9:23], atol=1e-6)
    np.testing.assert_allclose(quarter, half[8:24, 8:24], atol=0.1)


def test_a_box_partly_outside_the_image_is_padded_black(image):
    patch = crop_patch(image, [-16, -8, 48, 56], 64)
    np.testing.assert_allclose(patch[8:, 16:], image[:56, :48] / 65535, atol=1e-5)
    assert np.all(patch[:8] == 0) and np.all(patch[:, :16] == 0)


def test_a_fractional_box_samples_between_pixels():
    ramp = np.tile(np.arange(16, dtype=np.float32) / 16, (16, 1))       # value = x / 16
    patch = crop_patch(ramp, [2.5, 0, 10.5, 8], 8)
    # Pixel centres of the patch sit at x = 3, 4, ... 10: halfway between stored pixel centres.
    np.testing.assert_allclose(patch[0], (np.arange(3, 11) - 0.5) / 16, atol=1e-6)


def test_shrinking_a_fine_pattern_does_not_alias():
    checker = (np.indices((128, 128)).sum(0) % 2).astype(np.uint8) * 255
    patch = crop_patch(checker, [0, 0, 128, 128], 36)
    assert np.abs(patch - 0.5).max() < 0.02


def test_batch_path_equals_numpy_path(image):
    boxes = np.array([[0, 0, 64, 64], [10, 10, 26, 26], [-20, 30, 40, 90], [5.5, 7.25, 50.5, 52.25]])
    images = torch.from_numpy(image)[None, None].expand(len(boxes), 1, 64, 64)
    batch = crop_patch(images, torch.from_numpy(boxes), 24)
    assert batch.shape == (4, 1, 24, 24) and batch.dtype == torch.float32
    for b, box in enumerate(boxes):
        np.testing.assert_allclose(batch[b, 0].numpy(), crop_patch(image, box, 24), atol=1e-6)
    # Many patches of one image: the image need not be repeated.
    shared = crop_patch(torch.from_numpy(image)[None, None], boxes, 24)
    torch.testing.assert_close(shared, batch, atol=1e-6, rtol=0)


def test_boxes_may_be_records_boxes(image):
    box = Box("nodule", 8.0, 16.0, 40.0, 48.0)
    np.testing.assert_array_equal(crop_patch(image, box, 32), crop_patch(image, box.as_list(), 32))


@pytest.mark.parametrize("box, problem", [
    ([10, 10, 10, 20], "empty or inverted"),
    ([30, 10, 20, 20], "empty or inverted"),
    ([0, 0, float("nan"), 20], "non-finite"),
    ([64, 0, 80, 16], "entirely outside"),
    ([-30, -30, -1, -1], "entirely outside"),
])
def test_unusable_boxes_are_errors_that_name_the_box(image, box, problem):
    with pytest.raises(LeaderError, match=problem):
        crop_patch(image, box, 16)


def test_shape_mistakes_are_errors(image):
    with pytest.raises(LeaderError, match="2-D"):
        crop_patch(image[None], [0, 0, 8, 8], 8)
    with pytest.raises(LeaderError, match=r"\(B, 4\)"):
        crop_patch(torch.from_numpy(image)[None, None], np.zeros((2, 3)), 8)
    with pytest.raises(LeaderError, match="2 images but 3 boxes"):
        crop_patch(torch.zeros(2, 1, 8, 8), np.array([[0, 0, 8, 8]] * 3), 8)
