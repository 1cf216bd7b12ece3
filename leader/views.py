"""Views: the paper's augmentations as replayable parameters.

A view is K=10 numbers (`PARAM_NAMES`). The teacher cache stores them per item, and
`replay_views` is the one function that turns them into pixels, for the teacher at precompute time
and for the student at train time. The student therefore sees the very view its target came from.

Conventions, shared by every caller:

* Parameters depend on (seed, item key, view index) alone, so processes and teachers agree
  without talking to each other. View 0 is always `IDENTITY`.
* Geometry lives in normalised coordinates, [-1, 1] across the canvas, about its centre, so one
  view renders the same picture at 224 px for one teacher and at 512 px for another.
* The canvas is the square output. A non-square input is stretched onto it (its full extent maps
  to [-1, 1] on both axes); stored images and patches are square or nearly so, and stretching
  keeps every pixel of the image in view, which padding or cropping would not.
* A point x of the input canvas lands at  F(s * Sh * R * x + t)  in the output: rotation R
  (positive = counter-clockwise on screen), shear Sh, isotropic scale s, translation t (as a
  fraction of the side), then the horizontal flip F. Outside the image is black (0).
* Photometric changes follow, pixel by pixel: contrast about 0.5, brightness added, clamp to
  [0, 1], gamma. They apply to the whole canvas, fill included, as a torchvision affine followed by
  a colour jitter would.
* Shrinking is antialiased: where a view's output pixels span several input pixels, the image is
  first shrunk with the triangle filter of antialiased resizing (a mipmap) and then sampled once,
  so rendering at 512 px and then shrinking agrees with rendering straight at 224 px (see
  `warp_affine`).
* Segmentation masks follow their image through `replay_mask_views`: the same geometry
  (`view_theta`), sampled by nearest neighbour, and no photometric change, so a mask keeps its
  labels and stays on the pixels it marks.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from leader.errors import LeaderError

PARAM_NAMES = (
    "rotation_deg", "tx", "ty", "scale", "shear_x_deg", "shear_y_deg",
    "hflip", "brightness", "contrast", "gamma",
)
K = len(PARAM_NAMES)
IDENTITY = np.array([0, 0, 0, 1, 0, 0, 0, 0, 1, 1], dtype=np.float32)
IDENTITY.setflags(write=False)

_INDEX = {name: i for i, name in enumerate(PARAM_NAMES)}
_FAMILIES: dict[str, tuple[int, ...]] = {
    "rotation": (_INDEX["rotation_deg"],),
    "translation": (_INDEX["tx"], _INDEX["ty"]),
    "scale": (_INDEX["scale"],),
    "shear": (_INDEX["shear_x_deg"], _INDEX["shear_y_deg"]),
    "hflip": (_INDEX["hflip"],),
    "brightness": (_INDEX["brightness"],),
    "contrast": (_INDEX["contrast"],),
    "gamma": (_INDEX["gamma"],),
}
_FAMILIES["affine"] = (*_FAMILIES["rotation"], *_FAMILIES["translation"], *_FAMILIES["scale"],
                       *_FAMILIES["shear"])
_FAMILIES["photometric"] = (*_FAMILIES["brightness"], *_FAMILIES["contrast"], *_FAMILIES["gamma"])


@dataclass(frozen=True)
class ViewSpec:
    """Ranges of the paper's augmentations (random affine, h-flip, colour jitter)."""

    rotation_deg: float = 10.0          # uniform in [-r, r]
    translate: float = 0.05             # fraction of the side, uniform in [-t, t] per axis
    scale: tuple[float, float] = (0.9, 1.1)
    shear_deg: float = 5.0              # uniform in [-s, s], x and y drawn independently
    hflip_p: float = 0.5
    brightness: float = 0.1             # additive, uniform in [-b, b]
    contrast: float = 0.1               # multiplicative about 0.5, uniform in [1-c, 1+c]
    gamma: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        # Configs arrive as YAML/JSON: accept ints and lists, store floats and tuples so that
        # to_dict() is canonical and two equal specs compare equal.
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                if f.name in ("scale", "gamma"):
                    value = tuple(float(v) for v in value)
                    if len(value) != 2:
                        raise ValueError
                else:
                    value = float(value)
            except (TypeError, ValueError):
                expected = "a pair [low, high]" if f.name in ("scale", "gamma") else "a number"
                raise LeaderError(f"view spec: {f.name} must be {expected}, got {value!r}") from None
            object.__setattr__(self, f.name, value)
        self._check("rotation_deg", 0.0 <= self.rotation_deg <= 180.0, "in [0, 180]")
        self._check("translate", 0.0 <= self.translate <= 0.5, "in [0, 0.5]")
        # Shears past 45 degrees make the affine nearly singular; no CXR augmentation wants that.
        self._check("shear_deg", 0.0 <= self.shear_deg < 45.0, "in [0, 45)")
        self._check("hflip_p", 0.0 <= self.hflip_p <= 1.0, "in [0, 1]")
        self._check("brightness", 0.0 <= self.brightness <= 1.0, "in [0, 1]")
        self._check("contrast", 0.0 <= self.contrast < 1.0, "in [0, 1)")
        lo, hi = self.scale
        self._check("scale", 0.0 < lo <= hi <= 10.0, "a pair 0 < low <= high <= 10")
        lo, hi = self.gamma
        self._check("gamma", 0.0 < lo <= hi <= 10.0, "a pair 0 < low <= high <= 10")

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise LeaderError(f"view spec: {name} must be {rule}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; stored in the cache attrs and compared by the trainer."""
        d = asdict(self)
        d["scale"], d["gamma"] = list(self.scale), list(self.gamma)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ViewSpec":
        """Missing keys take the defaults (a config may override only a few); unknown keys are errors."""
        if isinstance(d, ViewSpec):
            return d
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LeaderError(f"view spec: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def views_compatible(a: ViewSpec | Mapping[str, Any], b: ViewSpec | Mapping[str, Any]) -> bool:
    """True when two specs (or their stored dicts) describe the same augmentation ranges."""
    return ViewSpec.from_dict(a).to_dict() == ViewSpec.from_dict(b).to_dict()


def view_param_families() -> dict[str, tuple[int, ...]]:
    """Augmentation family -> indices into PARAM_NAMES.

    Fine families: rotation, translation, scale, shear, hflip, brightness, contrast, gamma.
    Coarse families: affine (the four geometric ones), hflip, photometric (the three intensity ones).
    """
    return dict(_FAMILIES)


# --------------------------------------------------------------------------- sampling parameters

# Each (key, view) owns a block of counter values; 16 leaves room to add parameters without
# shifting the streams of existing ones.
_STREAMS_PER_VIEW = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _key_states(seed: int, keys: Sequence[str]) -> np.ndarray:
    """(N,) uint64: the first 8 bytes of sha256(f"{seed}\\0{key}"), one generator state per key."""
    if isinstance(keys, str):
        raise LeaderError("sample_view_params: keys must be a sequence of item keys, not one string")
    digests = []
    for key in keys:
        if not isinstance(key, str):
            raise LeaderError(f"sample_view_params: item key {key!r} is not a string")
        digests.append(hashlib.sha256(f"{int(seed)}\0{key}".encode()).digest()[:8])
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


def _uniforms(states: np.ndarray, n_views: int) -> np.ndarray:
    """(N, n_views, K) float64 uniforms in [0, 1).

    A counter-based SplitMix64 stream seeded by each key's sha256 state: uniform number c of key k
    is mix(state_k + (c + 1) * golden), with c = view * 16 + param. Because it is counter-based, it
    vectorises over every key and view at once, and view v is the same whatever n_views is asked.
    """
    view = np.arange(n_views, dtype=np.uint64)[:, None]
    param = np.arange(K, dtype=np.uint64)[None, :]
    counter = view * np.uint64(_STREAMS_PER_VIEW) + param + np.uint64(1)       # (V, K)
    z = states[:, None, None] + counter[None] * _GOLDEN                        # wraps mod 2**64
    # In place: this runs over N * V * K numbers (millions for a large shard set).
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    z >>= np.uint64(11)
    u = z.astype(np.float64)
    u *= 1.0 / (1 << 53)
    return u


def sample_view_params(spec: ViewSpec, seed: int, keys: Sequence[str], n_views: int) -> np.ndarray:
    """(N, n_views, K) float32 view parameters; row n, view v depends on (seed, keys[n], v) only.

    View 0 is IDENTITY: every item keeps one un-augmented view (evaluation and import teachers
    use it).
    """
    if not isinstance(spec, ViewSpec):
        raise LeaderError(f"sample_view_params: spec must be a ViewSpec, got {type(spec).__name__}")
    if int(n_views) < 1:
        raise LeaderError(f"sample_view_params: n_views must be at least 1, got {n_views}")
    u = _uniforms(_key_states(seed, keys), int(n_views))
    signed = 2.0 * u - 1.0
    p = np.empty(u.shape, dtype=np.float64)
    p[..., 0] = signed[..., 0] * spec.rotation_deg
    p[..., 1] = signed[..., 1] * spec.translate
    p[..., 2] = signed[..., 2] * spec.translate
    p[..., 3] = spec.scale[0] + u[..., 3] * (spec.scale[1] - spec.scale[0])
    p[..., 4] = signed[..., 4] * spec.shear_deg
    p[..., 5] = signed[..., 5] * spec.shear_deg
    p[..., 6] = u[..., 6] < spec.hflip_p
    p[..., 7] = signed[..., 7] * spec.brightness
    p[..., 8] = 1.0 + signed[..., 8] * spec.contrast
    p[..., 9] = spec.gamma[0] + u[..., 9] * (spec.gamma[1] - spec.gamma[0])
    p[:, 0] = IDENTITY
    return p.astype(np.float32)


def sample_family_params(
    spec: ViewSpec, family: str, seed: int, keys: Sequence[str], n_views: int
) -> np.ndarray:
    """Like sample_view_params, but only `family` varies; every other parameter is the identity.

    The varying values are the full views' own, so view v of the "rotation" family is view v of
    sample_view_params with everything but the rotation undone (what an invariance audit needs).
    """
    if family not in _FAMILIES:
        raise LeaderError(f"unknown view family {family!r}; known: {sorted(_FAMILIES)}")
    params = sample_view_params(spec, seed, keys, n_views)
    frozen = np.setdiff1d(np.arange(K), _FAMILIES[family])
    params[..., frozen] = IDENTITY[frozen]
    return params


# --------------------------------------------------------------------------- rendering


def to_unit_float(images: torch.Tensor | np.ndarray, max_value: float | None = None) -> torch.Tensor:
    """Pixels as float in [0, 1]: uint8 / 255, uint16 / 65535, float as is, or / max_value.

    float64 stays float64 (reference computations); every other type becomes float32, so bf16 or
    fp16 inputs never drive the geometry.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.require(images, requirements=["C", "W"]))
    if not isinstance(images, torch.Tensor):
        raise LeaderError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    if max_value is None:
        if images.dtype == torch.uint8:
            max_value = 255.0
        elif images.dtype == torch.uint16:
            max_value = 65535.0
        elif images.is_floating_point():
            max_value = 1.0
        else:
            raise LeaderError(
                f"images of dtype {images.dtype} need max_value (the value that means white); "
                "only uint8 and uint16 imply it"
            )
    elif not max_value > 0:
        raise LeaderError(f"max_value must be positive, got {max_value}")
    out = images.to(dtype)
    return out / max_value if max_value != 1.0 else out


# Minification up to this much is left to plain bilinear sampling: its aliasing is negligible
# there, and views rendered at the stored size then stay as sharp for a 10% zoom-out as for a
# 10% zoom-in (the default spec's scale range).
_BILINEAR_SLACK = 0.15


def _footprints(theta: np.ndarray, in_size: tuple[int, int], out_size: int) -> np.ndarray:
    """(B, 2): input pixels spanned by one output pixel along input x and y.

    The rows of the output-to-input Jacobian, in pixels; a row's norm is the longest step that
    input coordinate takes between neighbouring output pixels.
    """
    h, w = in_size
    jacobian = np.asarray(theta, dtype=np.float64)[:, :, :2] * np.array([[w], [h]]) / out_size
    return np.linalg.norm(jacobian, axis=2)


def prefilter_factors(footprints: np.ndarray) -> np.ndarray:
    """(B,) how much each view's image is shrunk before it is sampled: 1 (not at all) unless an
    output pixel spans more than 1 + slack input pixels; then its footprint rounded down to a
    quarter pixel, so that bilinear samples land about one input pixel apart. A function of the
    sample alone, so it renders the same in any batch, and a handful of values per batch."""
    footprint = footprints.max(axis=1)
    return np.where(footprint - _BILINEAR_SLACK > 1, np.floor(footprint * 4) / 4, 1.0)


def _affine_grid(theta: torch.Tensor, side: int) -> torch.Tensor:
    """F.affine_grid(theta, (B, 1, side, side), align_corners=False), built separably.

    x_in = a*x + b*y + c needs two broadcast multiply-adds per coordinate; affine_grid's batched
    matmul with an inner dimension of 3 is several times slower on the CPU.
    """
    c = (torch.arange(side, device=theta.device, dtype=theta.dtype) * 2 + 1) / side - 1
    rows = [theta[:, i, 0, None, None] * c + theta[:, i, 1, None, None] * c[:, None] + theta[:, i, 2, None, None]
            for i in range(2)]
    return torch.stack(rows, dim=-1)


def _sample(images: torch.Tensor, theta: torch.Tensor, side: int, spacing: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of an image that ends at its outer pixel edges, black beyond.

    Inside, samples clamp to the border pixel; across each edge the value ramps to 0 over one
    sample spacing (in input pixels, per sample and axis), which antialiases the edge at the
    resolution being sampled. grid_sample's own "zeros" padding is the same ramp fixed at one
    input pixel: too wide for a prefiltered image, whose outer rows it would darken.
    """
    _, _, h, w = images.shape
    grid = _affine_grid(theta, side)
    pixels = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # coverage = clamp(0.5 + (1 - |g|) * half / spacing) = clamp((0.5 + r) - r * |g|), r = half / spacing
    half_size = torch.tensor([w / 2.0, h / 2.0], device=grid.device, dtype=grid.dtype)
    r = (half_size / spacing)[:, None, None, :]
    coverage = torch.addcmul(0.5 + r, grid.abs(), r, value=-1.0).clamp_(0.0, 1.0)
    return pixels.mul_((coverage[..., 0] * coverage[..., 1]).unsqueeze(1))


def _sample_antialiased(
    images: torch.Tensor, theta: torch.Tensor, out_size: int, k: float, spacing: torch.Tensor
) -> torch.Tensor:
    """k: how many source pixels the group's smallest output footprint spans (1 = no shrink)."""
    if k <= 1:
        return _sample(images, theta, out_size, spacing)
    # Prefilter, then sample once (a mipmap): shrinking the source k times with the antialiasing
    # triangle filter (as in PIL and torchvision) costs one pass over the input, where supersampling
    # (rendering k times denser, then shrinking) costs k^2 samples per output pixel. Normalised
    # coordinates make theta valid at any source size; each output pixel now spans about one
    # source pixel, so one bilinear sample no longer aliases.
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h / k)), max(1, round(w / k))), mode="bilinear",
                          antialias=True, align_corners=False)
    return _sample(small, theta, out_size, spacing)


def warp_affine(images: torch.Tensor, theta: np.ndarray, out_size: int) -> torch.Tensor:
    """Sample (B, 1, H, W) float images on an out x out grid through `theta`, antialiased.

    theta (B, 2, 3) maps output to input in grid_sample's normalised coordinates
    (align_corners=False, so +-1 are the outer pixel edges); outside the image is 0. Where an output
    pixel spans more than one input pixel, the image is first shrunk with the antialiasing triangle
    filter (`prefilter_factors`), so a view rendered large and then shrunk matches the view rendered
    small. Same-size and enlarging views are plain bilinear, so the identity reproduces the image
    exactly. theta is planned on the host in float64; only the grid is built on the device. Samples
    are grouped by their prefilter (a handful of groups, never a loop over samples).
    """
    b, _, h, w = images.shape
    theta = np.asarray(theta, dtype=np.float64)
    footprints = _footprints(theta, (h, w), out_size)
    shrink = prefilter_factors(footprints)
    spacing = np.maximum(footprints / shrink[:, None], 1e-6)
    theta_t = torch.from_numpy(theta).to(device=images.device, dtype=images.dtype)
    spacing_t = torch.from_numpy(spacing).to(device=images.device, dtype=images.dtype)
    groups = np.unique(shrink)
    if len(groups) == 1:
        return _sample_antialiased(images, theta_t, out_size, float(groups[0]), spacing_t)
    out = images.new_empty((b, 1, out_size, out_size))
    for k in groups:
        rows = torch.from_numpy(np.flatnonzero(shrink == k)).to(images.device)
        out[rows] = _sample_antialiased(images[rows], theta_t[rows], out_size, float(k), spacing_t[rows])
    return out


def _as_host_params(params: torch.Tensor | np.ndarray, batch: int) -> np.ndarray:
    if isinstance(params, torch.Tensor):
        params = params.detach().to("cpu", torch.float64).numpy()
    params = np.asarray(params, dtype=np.float64)
    if params.shape != (batch, K):
        raise LeaderError(f"view params must have shape ({batch}, {K}) ({', '.join(PARAM_NAMES)}), "
                          f"got {tuple(params.shape)}")
    if not np.isfinite(params).all():
        rows = np.flatnonzero(~np.isfinite(params).all(axis=1))
        raise LeaderError(f"view params of batch rows {rows[:10].tolist()} are not finite")
    for name, rule in (("scale", "positive"), ("gamma", "positive")):
        bad = np.flatnonzero(params[:, _INDEX[name]] <= 0)
        if bad.size:
            raise LeaderError(f"view param {name} must be {rule}; batch rows {bad[:10].tolist()}")
    shear = params[:, [_INDEX["shear_x_deg"], _INDEX["shear_y_deg"]]]
    bad = np.flatnonzero((np.abs(shear) >= 45).any(axis=1))
    if bad.size:
        raise LeaderError(f"view param shear must lie in (-45, 45) degrees; batch rows {bad[:10].tolist()}")
    return params


def view_theta(params: np.ndarray) -> np.ndarray:
    """(B, K) view parameters -> (B, 2, 3) float64 output-to-input affine for grid_sample."""
    p = np.asarray(params, dtype=np.float64)
    rot = np.deg2rad(p[:, 0])
    # On screen y points down, so a counter-clockwise turn is [[c, s], [-s, c]] in (x, y).
    c, s = np.cos(rot), np.sin(rot)
    rotation = np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)
    shx, shy = np.tan(np.deg2rad(p[:, 4])), np.tan(np.deg2rad(p[:, 5]))
    ones = np.ones_like(shx)
    shear = np.stack([np.stack([ones, shx], -1), np.stack([shy, ones], -1)], -2)
    forward = p[:, 3, None, None] * (shear @ rotation)               # s * Sh * R
    shift = 2.0 * p[:, 1:3]                                          # side fractions -> [-1, 1] units
    flip = np.where(p[:, 6] >= 0.5, -1.0, 1.0)
    # Output o = Fl(A x + t)  =>  x = A^-1 (Fl o - t); Fl is its own inverse.
    inverse = np.linalg.inv(forward)
    theta = np.empty((len(p), 2, 3), dtype=np.float64)
    theta[:, :, 0] = inverse[:, :, 0] * flip[:, None]
    theta[:, :, 1] = inverse[:, :, 1]
    theta[:, :, 2] = -(inverse @ shift[:, :, None])[:, :, 0]
    return theta


def _photometric(x: torch.Tensor, params: np.ndarray) -> torch.Tensor:
    columns = [_INDEX["brightness"], _INDEX["contrast"], _INDEX["gamma"]]
    per_sample = torch.from_numpy(params[:, columns]).to(device=x.device, dtype=x.dtype)
    brightness, contrast, gamma = (per_sample[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = ((x - 0.5) * contrast + 0.5 + brightness).clamp_(0.0, 1.0)
    return x.pow_(gamma)


def replay_views(
    images: torch.Tensor | np.ndarray,
    params: torch.Tensor | np.ndarray,
    out_size: int,
    *,
    max_value: float | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Render view `params[b]` of `images[b]` at out_size x out_size.

    images: (B, 1, H, W) uint8, uint16 or float in [0, 1] (or give max_value), on any device; the
      work runs there. params: (B, K) tensor or ndarray (see PARAM_NAMES). They are planned on the
      host, so hand them over from there, as the cache does; a device tensor is copied back, which
      waits for the device.
    Returns (B, 1, out, out) in [0, 1]: float32, or float64 for float64 input.
    Pass memory_format=torch.channels_last for a channels-last student.
    """
    x = to_unit_float(images, max_value)
    if x.dim() != 4 or x.shape[1] != 1:
        raise LeaderError(f"replay_views: images must be (B, 1, H, W), got {tuple(x.shape)}")
    out_size = int(out_size)
    if out_size < 1:
        raise LeaderError(f"replay_views: out_size must be positive, got {out_size}")
    p = _as_host_params(params, x.shape[0])
    out = _photometric(warp_affine(x, view_theta(p), out_size), p)
    return out.contiguous(memory_format=memory_format)


def replay_mask_views(masks: torch.Tensor | np.ndarray, params: torch.Tensor | np.ndarray, out_size: int) -> torch.Tensor:
    """The geometry of view `params[b]` applied to mask `masks[b]`, nearest neighbour, at out x out.

    masks: (B, 1, H, W) bool or integer (the bit-packed classes of `leader.shards.masks`), on any
    device. Each output pixel takes the label of the input pixel under its centre, mapped through
    the very affine that `replay_views` renders the image with, so image and mask stay aligned at
    any out_size; outside the image is 0 (no class). Returns the input's dtype (uint16, which torch
    barely supports, comes back as int32).
    """
    if isinstance(masks, np.ndarray):
        masks = torch.from_numpy(np.require(masks, requirements=["C", "W"]).astype(
            np.int32 if masks.dtype == np.uint16 else masks.dtype, copy=False))
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise LeaderError(f"replay_mask_views: masks must be (B, 1, H, W), got {tuple(masks.shape)}")
    if masks.is_floating_point():
        raise LeaderError(f"replay_mask_views: masks must be bool or integer labels, got {masks.dtype}")
    out_size = int(out_size)
    if out_size < 1:
        raise LeaderError(f"replay_mask_views: out_size must be positive, got {out_size}")
    dtype = torch.int32 if masks.dtype == torch.uint16 else masks.dtype
    theta = torch.from_numpy(view_theta(_as_host_params(params, masks.shape[0]))).to(masks.device, torch.float64)
    # Labels up to 2^16 are exact in float32; nearest sampling only ever copies them.
    values = masks.to(torch.int32).to(torch.float32)
    grid = _affine_grid(theta, out_size).to(torch.float32)
    out = F.grid_sample(values, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(dtype)
