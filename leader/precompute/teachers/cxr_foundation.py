"""`cxr-foundation`: Google CXR Foundation v2 (ELIXR-C), a TensorFlow SavedModel.

    create_teacher("cxr-foundation", model="path/to/elixr-c-v2-pooled", device="cuda")

The model is called the way Google serves it (docs/design.md, section 6): a batch of serialized
tf.train.Example, each with `image/encoded` = a grayscale PNG and `image/format` = b"png", passed
as `signatures["serving_default"](input_example=...)`. The PNG follows Google's client rule: 8-bit
images stay 8-bit; anything else is stretched to the full uint16 range and sent as a 16-bit PNG.
There is no client-side resize (`input_size = None`): the model resizes internally, so views are
rendered at the stored size. The output `feature_maps_0` (B, 8, 8, 1376) is mean-pooled to 1376-d;
a model that already returns a flat `embedding` (B, D) is used as is.

Before the SavedModel is loaded, `savedmodel_gate` lists the ops of its graph and functions and
refuses file-system, Python-call and network ops unless `trust_model=True` (`--trust-model`):
loading a SavedModel runs its restore and init functions, and calling it runs its graph.

TensorFlow is imported only inside functions, after torch (importing TF first can crash torch in
the same process), with its logging quietened, its threads limited to torch's, and its GPU memory
grown on demand so that it shares the card with torch's view rendering.

`export_cxr_foundation_savedmodel` writes the same serving signature around any TF backbone; the
demo uses it to ship its small disease teacher, and the tests use it to build a tiny real model.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from leader.errors import LeaderError
from leader.io import sha256_tree
from leader.precompute.teachers import register_teacher
from leader.precompute.teachers.base import Teacher, is_remote, local_model_path
from leader.precompute.teachers.savedmodel_gate import check_savedmodel

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUT_NAME = "input_example"
FEATURE_MAPS = "feature_maps_0"
FLAT_EMBEDDING = "embedding"
IMAGE_KEY = "image/encoded"
FORMAT_KEY = "image/format"


def _import_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    return tf


def _configure_tensorflow(tf: Any, device: str, threads: int | None) -> None:
    """Threads as many as torch's, and the GPU named by `device` (none for "cpu"), grown on demand."""
    try:
        n = threads or torch.get_num_threads()
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(min(n, 2))
        gpus = tf.config.list_physical_devices("GPU")
        if device == "cpu" or not gpus:
            tf.config.set_visible_devices([], "GPU")
            return
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= len(gpus):
            raise LeaderError(f"teacher 'cxr-foundation': device {device!r} but TensorFlow sees {len(gpus)} GPU(s)")
        tf.config.set_visible_devices(gpus[index], "GPU")
        tf.config.experimental.set_memory_growth(gpus[index], True)
    except RuntimeError:
        # TF's runtime already started in this process (an earlier teacher or export); its
        # settings are fixed from then on and still apply.
        log.debug("TensorFlow already initialised; keeping its device and thread settings")


def encode_png(image: np.ndarray, bits: int) -> bytes:
    """A 2-D float image in [0, 1] -> the grayscale PNG CXR Foundation's client would send.

    bits == 8: an 8-bit PNG of round(x * 255). Otherwise the image is quantised to uint16 (what a
    16-bit stored PNG holds) and its range stretched to the full 0..65535, as Google's client does
    for every non-uint8 image; a constant image becomes all zeros.
    """
    x = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    if bits == 8:
        pixels = np.rint(x * 255.0).astype(np.uint8)
    else:
        quantised = np.rint(x * 65535.0)
        low, high = quantised.min(), quantised.max()
        if high == low:
            pixels = np.zeros(quantised.shape, np.uint16)
        else:
            pixels = np.interp(quantised, (low, high), (0.0, 65535.0)).astype(np.uint16)
    buffer = io.BytesIO()
    # Stored, not deflated: the bytes never leave this process, the model decodes identical
    # pixels, and encoding is 2-8x faster than PIL's default level (measured at 512 px).
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def serialize_example(png: bytes) -> bytes:
    """The tf.train.Example the serving signature parses: image/encoded and image/format."""
    tf = _import_tensorflow()
    feature = {IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[png])),
               FORMAT_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png"]))}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


@register_teacher("cxr-foundation")
class CxrFoundationTeacher(Teacher):
    kind = "cxr-foundation"
    input_size = None
    needs_pixels = True

    def __init__(self, model: str | Path | None, device: str = "cpu", allow_remote: bool = False,
                 threads: int | None = None, trust_model: bool = False):
        # The path first: a URL without --allow-remote is refused before TensorFlow loads (seconds).
        self.path = self._resolve(model, allow_remote)
        self._tf = _import_tensorflow()
        _configure_tensorflow(self._tf, device, threads)
        # Loading runs the model's restore and init functions, so its ops are checked before it.
        trusted = check_savedmodel(self.path, trust_model=trust_model, kind=self.kind)
        if trusted:
            log.warning("loading SavedModel %s with --trust-model although it holds: %s", self.path,
                        "; ".join(f.describe() for f in trusted))
        try:
            self._loaded = self._tf.saved_model.load(str(self.path))
        except Exception as exc:  # not a SavedModel, or a corrupt one
            raise LeaderError(f"teacher {self.kind!r}: cannot load SavedModel {str(self.path)!r}: {exc}") from exc
        signatures = dict(getattr(self._loaded, "signatures", {}) or {})
        if SIGNATURE not in signatures:
            raise LeaderError(f"SavedModel {str(self.path)!r} has no {SIGNATURE!r} signature "
                              f"(it has: {', '.join(signatures) or 'none'})")
        self._serve = signatures[SIGNATURE]
        inputs = self._serve.structured_input_signature[1]
        if INPUT_NAME not in inputs:
            raise LeaderError(f"SavedModel {str(self.path)!r}: {SIGNATURE!r} takes {', '.join(inputs) or 'no named inputs'}, "
                              f"not {INPUT_NAME!r}; is this a CXR Foundation model?")
        self.output_name = self._choose_output(self._serve.structured_outputs)
        self.dim = self._discover_dim()
        self.fingerprint = sha256_tree(self.path)
        self.preprocessing = {
            "input": f"serialized tf.train.Example: {IMAGE_KEY} = grayscale PNG, {FORMAT_KEY} = b'png'",
            "png": "8-bit stored: uint8 round(x*255); otherwise uint16 stretched to 0..65535",
            "resize": "none on the client (the model resizes internally)",
            "output": self.output_name,
            "pooling": "mean over feature-map height and width" if self.output_name == FEATURE_MAPS else "none",
        }

    def _resolve(self, model: str | Path | None, allow_remote: bool) -> Path:
        if model is not None and is_remote(model) and allow_remote:
            import tensorflow_hub as hub

            # resolve() downloads into the hub cache and returns that local directory, which can
            # then be fingerprinted like any local model.
            return Path(hub.resolve(str(model)))
        return local_model_path(model, self.kind, want="dir")

    def _choose_output(self, outputs: dict) -> str:
        for name, rank in ((FEATURE_MAPS, 4), (FLAT_EMBEDDING, 2)):
            if name in outputs:
                shape = outputs[name].shape
                if shape.rank is not None and shape.rank != rank:
                    raise LeaderError(f"SavedModel {str(self.path)!r}: output {name!r} has shape {shape}, expected rank {rank}")
                return name
        found = ", ".join(f"{k} {v.shape}" for k, v in outputs.items()) or "none"
        raise LeaderError(f"SavedModel {str(self.path)!r} returns neither {FEATURE_MAPS!r} (B,h,w,D) "
                          f"nor {FLAT_EMBEDDING!r} (B,D); outputs found: {found}")

    def _discover_dim(self) -> int:
        declared = self._serve.structured_outputs[self.output_name].shape[-1]
        if declared is not None:
            return int(declared)
        probe = np.zeros((64, 64), np.float32)
        return int(self._call([serialize_example(encode_png(probe, 8))]).shape[-1])

    def _call(self, examples: list[bytes]) -> np.ndarray:
        tf = self._tf
        outputs = self._serve(**{INPUT_NAME: tf.constant(examples, dtype=tf.string)})
        values = outputs[self.output_name]
        if self.output_name == FEATURE_MAPS:
            values = tf.reduce_mean(values, axis=(1, 2))
        return values.numpy().astype(np.float32, copy=False)

    def _embed(self, pixels: torch.Tensor, bits: int) -> np.ndarray:
        images = pixels[:, 0].detach().to("cpu", torch.float32).numpy()
        return self._call([serialize_example(encode_png(image, bits)) for image in images])

    def close(self) -> None:
        self._serve = None
        self._loaded = None


def export_cxr_foundation_savedmodel(backbone: Callable[[Any], Any], out_dir: str | Path, input_size: int) -> Path:
    """Save `backbone` behind CXR Foundation v2's serving signature; returns the SavedModel dir.

    backbone: any TF callable (a Keras model, a tf.Module) mapping (B, H, W, 1) float32 images in
    [0, 1] to (B, h, w, D) feature maps. The saved `serving_default(input_example)` parses the
    Examples, decodes each PNG (8- or 16-bit), resizes it to input_size x input_size (bilinear,
    antialiased) inside the model, as the real model does, and returns {"feature_maps_0": ...}.
    The directory appears complete or not at all.
    """
    tf = _import_tensorflow()
    size = int(input_size)
    module = _serving_module(tf, backbone, size)
    probe = module.backbone(tf.zeros([1, size, size, 1], tf.float32))
    if len(probe.shape) != 4:
        raise LeaderError(f"export: the backbone must return (B, h, w, D) feature maps, got shape {tuple(probe.shape)}")

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tf.saved_model.save(module, str(staging), signatures={SIGNATURE: module.serve})
        if out_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, retired / "model")
            os.replace(staging, out_dir)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def _serving_module(tf: Any, backbone: Callable[[Any], Any], size: int) -> Any:
    """A tf.Module holding the backbone and the serving function (built here: TF is lazy)."""

    class CxrFoundationServing(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="cxr_foundation_serving")
            self.backbone = backbone

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_NAME)])
        def serve(self, input_example: Any) -> dict:
            parsed = tf.io.parse_example(input_example, {
                IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
                FORMAT_KEY: tf.io.FixedLenFeature([], tf.string, default_value="png"),
            })

            def decode(png: Any) -> Any:
                # Decoding as uint16 scales an 8-bit PNG by 257, so both depths land on one scale.
                image = tf.cast(tf.io.decode_png(png, channels=1, dtype=tf.uint16), tf.float32) / 65535.0
                return tf.image.resize(image, [size, size], method="bilinear", antialias=True)

            images = tf.map_fn(decode, parsed[IMAGE_KEY],
                               fn_output_signature=tf.TensorSpec([size, size, 1], tf.float32))
            return {FEATURE_MAPS: self.backbone(images)}

    return CxrFoundationServing()
