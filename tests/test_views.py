"""Views: replayable augmentation parameters, and the one function that renders them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leader.errors import LeaderError
from leader.views import (
    IDENTITY,
    K,
    PARAM_NAMES,
    ViewSpec,
    replay_mask_views,
    replay_views,
    sample_family_params,
    sample_view_params,
    view_param_families,
    view_theta,
    views_compatible,
)


def view(**changes: float) -> np.ndarray:
    """One (1, K) parameter row: the identity with some parameters changed."""
    p = IDENTITY.copy()
    for name, value in changes.items():
        p[PARAM_NAMES.index(name)] = value
    return p[None]


def textured(side: int, seed: int = 0) -> np.ndarray:
    """A float image in [0, 1] with oriented waves up to 1/8 cycle per pixel and hard-edged discs:
    detail a 224 px render cannot hold, so any aliasing or misregistration shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    img = np.full((side, side), 0.5)
    for _ in range(12):
        freq, angle, phase = rng.uniform(1, side / 8), rng.uniform(0, 2 * np.pi), rng.uniform(0, 6)
        img += 0.05 * np.sin(2 * np.pi * freq * (np.cos(angle) * x + np.sin(angle) * y) + phase)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.15)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += 0.2
    return np.clip(img, 0, 1)


# --------------------------------------------------------------------------- ViewSpec


def test_view_spec_round_trips_through_json():
    spec = ViewSpec(rotation_deg=15, scale=[0.8, 1.2], hflip_p=0)
    stored = json.loads(json.dumps(spec.to_dict()))
    assert ViewSpec.from_dict(stored) == spec
    assert views_compatible(spec, stored)
    assert not views_compatible(spec, ViewSpec())
    # A config may override a few settings; the rest are the defaults.
    assert ViewSpec.from_dict({"rotation_deg": 15.0}) == ViewSpec(rotation_deg=15.0)


@pytest.mark.parametrize("setting, value", [
    ("rotation_deg", -1.0), ("translate", 0.7), ("shear_deg", 45.0), ("hflip_p", 1.5),
    ("brightness", -0.1), ("contrast", 1.0), ("scale", (1.2, 0.8)), ("gamma", (0.0, 1.0)),
    ("scale", (1.0,)), ("rotation_deg", "ten"),
])
def test_view_spec_rejects_out_of_range_settings(setting, value):
    with pytest.raises(LeaderError, match=setting):
        ViewSpec(**{setting: value})


def test_view_spec_from_dict_names_unknown_settings():
    with pytest.raises(LeaderError, match="rotation"):
        ViewSpec.from_dict({"rotation": 10})


# --------------------------------------------------------------------------- sampling


def test_params_depend_only_on_seed_key_and_view():
    spec = ViewSpec()
    first = sample_view_params(spec, 7, ["nih14/a", "nih14/b", "nih14/c"], n_views=4)
    # Another process, other neighbours, another view count: the same views for the same key.
    again = sample_view_params(spec, 7, ["nih14/c", "nih14/a"], n_views=6)
    assert first.shape == (3, 4, K) and first.dtype == np.float32
    np.testing.assert_array_equal(again[1, :4], first[0])
    np.testing.assert_array_equal(again[0, :4], first[2])
    assert not np.allclose(first[0, 1:], first[1, 1:])
    assert not np.allclose(sample_view_params(spec, 8, ["nih14/a"], 4)[0, 1:], first[0, 1:])
    np.testing.assert_array_equal(first[:, 0], np.broadcast_to(IDENTITY, (3, K)))


def test_params_cover_the_spec_ranges_and_no_more():
    spec = ViewSpec(rotation_deg=20, translate=0.1, scale=(0.8, 1.25), shear_deg=8, hflip_p=0.3,
                    brightness=0.2, contrast=0.3, gamma=(0.7, 1.4))
    params = sample_view_params(spec, 0, [f"k{i}" for i in range(2000)], 3)[:, 1:].reshape(-1, K)
    bounds = {"rotation_deg": (-20, 20), "tx": (-0.1, 0.1), "ty": (-0.1, 0.1),
              "scale": (0.8, 1.25), "shear_x_deg": (-8, 8), "shear_y_deg": (-8, 8),
              "brightness": (-0.2, 0.2), "contrast": (0.7, 1.3), "gamma": (0.7, 1.4)}
    for name, (lo, hi) in bounds.items():
        column = params[:, PARAM_NAMES.index(name)]
        assert lo - 1e-6 <= column.min() < lo + 0.02 * (hi - lo), name
        assert hi - 0.02 * (hi - lo) < column.max() <= hi + 1e-6, name
    flips = params[:, PARAM_NAMES.index("hflip")]
    assert set(np.unique(flips)) == {0.0, 1.0}
    assert abs(flips.mean() - 0.3) < 0.03


def test_a_spec_with_no_ranges_gives_only_identity_views():
    still = ViewSpec(rotation_deg=0, translate=0, scale=(1, 1), shear_deg=0, hflip_p=0,
                     brightness=0, contrast=0, gamma=(1, 1))
    params = sample_view_params(still, 3, ["a", "b"], 5)
    np.testing.assert_array_equal(params, np.broadcast_to(IDENTITY, params.shape))


def test_families_partition_the_parameters():
    families = view_param_families()
    fine = ["rotation", "translation", "scale", "shear", "hflip", "brightness", "contrast", "gamma"]
    indices = sorted(i for name in fine for i in families[name])
    assert indices == list(range(K))
    assert sorted(families["affine"] + families["hflip"] + families["photometric"]) == list(range(K))


@pytest.mark.parametrize("family", ["rotation", "shear", "hflip", "photometric", "affine"])
def test_family_params_vary_only_that_family(family):
    keys = [f"k{i}" for i in range(50)]
    full = sample_view_params(ViewSpec(), 1, keys, 3)
    only = sample_family_params(ViewSpec(), family, 1, keys, 3)
    varying = list(view_param_families()[family])
    fixed = [i for i in range(K) if i not in varying]
    np.testing.assert_array_equal(only[..., varying], full[..., varying])
    np.testing.assert_array_equal(only[..., fixed], np.broadcast_to(IDENTITY[fixed], only[..., fixed].shape))


def test_sampling_rejects_bad_requests():
    with pytest.raises(LeaderError, match="n_views"):
        sample_view_params(ViewSpec(), 0, ["a"], 0)
    with pytest.raises(LeaderError, match="sequence"):
        sample_view_params(ViewSpec(), 0, "a", 2)
    with pytest.raises(LeaderError, match="family"):
        sample_family_params(ViewSpec(), "blur", 0, ["a"], 2)


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("dtype, white", [(np.uint8, 255), (np.uint16, 65535), (np.float32, 1.0)])
def test_identity_view_reproduces_the_image(dtype, white):
    rng = np.random.default_rng(0)
    img = (rng.random((2, 1, 48, 48)) * white).astype(dtype)
    out = replay_views(torch.from_numpy(img), np.repeat(IDENTITY[None], 2, 0), 48)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 48, 48)
    np.testing.assert_allclose(out.numpy(), img.astype(np.float64) / white, atol=1e-5)


def test_hflip_mirrors_an_asymmetric_image():
    img = torch.from_numpy(textured(40))[None, None].float()
    out = replay_views(img, view(hflip=1), 40)
    torch.testing.assert_close(out, img.flip(-1), atol=1e-5, rtol=0)


def test_rotation_by_90_degrees_turns_counter_clockwise():
    img = np.zeros((64, 64), np.uint8)
    img[10, 50] = 255                                   # a marked pixel, up and to the right
    out = replay_views(torch.from_numpy(img)[None, None], view(rotation_deg=90), 64)[0, 0]
    assert np.unravel_index(int(out.argmax()), out.shape) == (13, 10)    # now up and to the left
    textured_img = textured(64)
    out = replay_views(torch.from_numpy(textured_img)[None, None], view(rotation_deg=90), 64)
    np.testing.assert_allclose(out[0, 0].numpy(), np.rot90(textured_img), atol=1e-5)


def test_translation_is_a_fraction_of_the_side_and_fills_black():
    img = torch.from_numpy(textured(64))[None, None].float()
    out = replay_views(img, view(tx=0.25, ty=-0.125), 64)[0, 0]     # 16 px right, 8 px up
    torch.testing.assert_close(out[:56, 16:], img[0, 0, 8:, :48], atol=1e-5, rtol=0)
    assert out[:, :16].abs().max() < 1e-6 and out[56:].abs().max() < 1e-6


def test_zoom_out_shrinks_the_image_about_the_centre():
    white = torch.ones(1, 1, 64, 64)
    out = replay_views(white, view(scale=0.5), 64)[0, 0]
    assert out[17:47, 17:47].min() > 1 - 1e-5                   # the image now fills the middle half
    assert out[:15].max() < 1e-6 and out[:, 49:].max() < 1e-6


def test_photometric_changes_follow_their_closed_form():
    grey = torch.full((1, 1, 16, 16), 0.3)
    out = replay_views(grey, view(brightness=0.05, contrast=1.2, gamma=0.8), 16)
    expected = ((0.3 - 0.5) * 1.2 + 0.5 + 0.05) ** 0.8
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-6, rtol=0)
    bright = replay_views(torch.ones(1, 1, 8, 8), view(brightness=0.3), 8)
    assert bright.max() == 1.0                                  # clamped to [0, 1]


@pytest.mark.parametrize("side, max_mean, max_abs", [(512, 0.01, 0.25), (1024, 0.015, 0.25)])
def test_a_view_renders_alike_at_any_resolution(side, max_mean, max_abs):
    """Rendering at 512 px then shrinking to 224 px matches rendering at 224 px directly.

    Tolerances: mean |diff| < 0.01 (512 input) or 0.015 (1024 input, shrunk twice on the
    reference path), max |diff| < 0.25 over every pixel. The worst pixels lie on the image's border
    against the black fill: shrinking is a prefilter then one bilinear sample (a mipmap, about 8x
    cheaper than rendering densely), which spreads that hard edge by about one output pixel.
    """
    n = 6
    images = torch.from_numpy(textured(side)).float()[None, None].expand(n, 1, side, side)
    params = sample_view_params(ViewSpec(), 0, [f"item{i}" for i in range(n)], 2)[:, 1]
    direct = replay_views(images, params, 224)
    large = replay_views(images, params, 512)
    shrunk = replay_views(large, np.repeat(IDENTITY[None], n, 0), 224)
    diff = (direct - shrunk).abs()
    assert diff.mean() < max_mean and diff.max() < max_abs
    # Against torch's own antialiased resize, an independent implementation of the shrink.
    resized = F.interpolate(large, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    diff = (direct - resized).abs()
    assert diff.mean() < max_mean and diff.max() < max_abs


def test_shrinking_is_antialiased():
    checker = (np.indices((128, 128)).sum(0) % 2).astype(np.uint8) * 255
    out = replay_views(torch.from_numpy(checker)[None, None], view(rotation_deg=7), 45)
    inside = out[0, 0, 8:-8, 8:-8]
    # A 1-pixel checkerboard has no detail at 45 px: it must come out flat grey, not moire.
    assert (inside - 0.5).abs().max() < 0.06


def test_float64_and_float32_renders_agree():
    params = sample_view_params(ViewSpec(), 0, ["a", "b", "c"], 2)[:, 1]
    img = torch.from_numpy(textured(96)).expand(3, 1, 96, 96)
    exact = replay_views(img.double(), params, 64)
    assert exact.dtype == torch.float64
    torch.testing.assert_close(replay_views(img.float(), params, 64).double(), exact, atol=1e-4, rtol=0)


def test_a_view_renders_the_same_alone_as_in_a_batch():
    # Zooms from 0.4 to 2 need different supersampling; grouping must not change any sample.
    params = np.repeat(IDENTITY[None], 4, 0)
    params[:, PARAM_NAMES.index("scale")] = [0.4, 0.7, 1.0, 2.0]
    params[:, PARAM_NAMES.index("rotation_deg")] = [5, -3, 10, 0]
    images = torch.from_numpy(np.stack([textured(80, seed) for seed in range(4)])[:, None]).float()
    batch = replay_views(images, params, 48)
    for b in range(4):
        torch.testing.assert_close(batch[b:b + 1], replay_views(images[b:b + 1], params[b:b + 1], 48),
                                   atol=1e-6, rtol=0)


def test_tensor_params_bf16_images_and_channels_last_output():
    params = sample_view_params(ViewSpec(), 0, ["a", "b"], 2)[:, 1]
    img = torch.from_numpy(textured(64)).float().expand(2, 1, 64, 64)
    reference = replay_views(img, params, 32)
    torch.testing.assert_close(replay_views(img, torch.from_numpy(params), 32), reference)
    out = replay_views(img.bfloat16(), params, 32, memory_format=torch.channels_last)
    assert out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference, atol=1e-2, rtol=0)    # bf16 pixels: 8-bit mantissa


def test_non_square_images_are_stretched_onto_the_square_canvas():
    wide = torch.zeros(1, 1, 32, 64)
    wide[..., :, :32] = 1.0                                   # left half white
    out = replay_views(wide, IDENTITY[None], 32)[0, 0]
    assert out[:, :15].min() > 1 - 1e-6 and out[:, 17:].max() < 1e-6


def test_replay_rejects_bad_input():
    img = torch.zeros(2, 1, 16, 16)
    with pytest.raises(LeaderError, match=r"\(2, 10\)"):
        replay_views(img, np.repeat(IDENTITY[None], 3, 0), 16)
    with pytest.raises(LeaderError, match="not finite"):
        replay_views(img, np.stack([IDENTITY, view(rotation_deg=np.nan)[0]]), 16)
    with pytest.raises(LeaderError, match="scale"):
        replay_views(img, np.stack([IDENTITY, view(scale=0)[0]]), 16)
    with pytest.raises(LeaderError, match="max_value"):
        replay_views(img.int(), np.repeat(IDENTITY[None], 2, 0), 16)
    with pytest.raises(LeaderError, match=r"\(B, 1, H, W\)"):
        replay_views(torch.zeros(2, 3, 16, 16), np.repeat(IDENTITY[None], 2, 0), 16)
    # Integer pixels of another range work once their white level is given.
    out = replay_views((img + 1000).int(), np.repeat(IDENTITY[None], 2, 0), 16, max_value=4000)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


# --------------------------------------------------------------------------- masks


def bounding_box(plane: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(plane)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], float)


def mapped_box(box, params: np.ndarray, in_size: int, out_size: int) -> np.ndarray:
    """Where a box's corners land in the output, by inverting the view's output-to-input affine."""
    theta = view_theta(params)[0]
    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], float) * 2 / in_size - 1
    out = np.linalg.solve(theta[:, :2], (corners - theta[:, 2]).T).T
    pixels = (out + 1) * out_size / 2
    return np.concatenate([pixels.min(0), pixels.max(0)])


@pytest.mark.parametrize("out_size", [96, 64, 150])
def test_a_mask_moves_with_its_finding_through_a_view(out_size):
    # A bright square finding and its mask (class bit 9 of a 16-bit mask), through a rotation,
    # shear, zoom, shift and flip, rendered smaller, alike and larger than the stored image.
    box = (50, 20, 70, 40)
    image = torch.zeros(1, 1, 96, 96)
    image[..., 20:40, 50:70] = 1.0
    mask = np.zeros((1, 1, 96, 96), np.uint16)
    mask[..., 20:40, 50:70] = 1 << 9
    params = view(rotation_deg=20, tx=0.1, ty=-0.05, scale=1.2, shear_x_deg=4, hflip=1)
    finding = replay_views(image, params, out_size)[0, 0].numpy() > 0.5
    moved = replay_mask_views(mask, params, out_size)
    assert moved.dtype == torch.int32 and set(np.unique(moved.numpy())) == {0, 1 << 9}   # labels, never blends
    mask_box = bounding_box(moved[0, 0].numpy() > 0)
    step = out_size / 96 * 1.2                     # one input pixel, in output pixels
    np.testing.assert_allclose(mask_box, bounding_box(finding), atol=1 + step)
    np.testing.assert_allclose(mask_box, mapped_box(box, params, 96, out_size), atol=1 + step)
    # The identity keeps a mask as it is; its photometric parameters never touch a mask.
    same = torch.from_numpy(mask.astype(np.int64))
    assert torch.equal(replay_mask_views(same, view(brightness=0.3, gamma=2.0), 96), same)


def test_mask_replay_takes_labels_only():
    with pytest.raises(LeaderError, match="bool or integer labels"):
        replay_mask_views(torch.zeros(1, 1, 8, 8), IDENTITY[None], 8)
    with pytest.raises(LeaderError, match=r"\(B, 1, H, W\)"):
        replay_mask_views(torch.zeros(1, 8, 8, dtype=torch.uint8), IDENTITY[None], 8)
    wide = torch.zeros(1, 1, 32, 64, dtype=torch.bool)
    wide[..., :, :32] = True                                   # stretched onto the canvas as images are
    out = replay_mask_views(wide, IDENTITY[None], 32)[0, 0]
    assert out.dtype == torch.bool and out[:, :16].all() and not out[:, 16:].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_render_matches_cpu():
    params = sample_view_params(ViewSpec(), 0, [f"k{i}" for i in range(8)], 2)[:, 1]
    img = torch.from_numpy((textured(512) * 255).astype(np.uint8)).expand(8, 1, 512, 512)
    cpu = replay_views(img, params, 224)
    gpu = replay_views(img.cuda(), torch.from_numpy(params).cuda(), 224)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-3, rtol=0)
