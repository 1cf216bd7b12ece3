"""The demo's two teachers, trained on the phantom and saved in the real teachers' formats.

    leader demo teacher disease --shards runs/demo/shards/phantom --out runs/demo/teachers/disease
    leader demo teacher anatomy --shards runs/demo/shards/phantom --out runs/demo/teachers/anatomy.pth

Both learn from the TRAIN split of the shards only, and each from its own kind of supervision:

- the disease teacher is a small Keras CNN trained on the image-level disease labels alone
  (multi-label sigmoid cross-entropy). Its convolutional trunk is exported with
  `export_cxr_foundation_savedmodel`, so it is called exactly like CXR Foundation v2:
  `serving_default(input_example=<serialized tf.train.Example PNGs>)` -> `feature_maps_0`
  (B, 8, 8, D) at 128 px input. TensorFlow is imported only when it trains, and `leader demo`
  runs that step in a process of its own.
- the anatomy teacher is a small timm CNN that never sees a disease label. It learns where a patch
  lies in the body: from a patch cut anywhere in the chest (at random position and size), it
  regresses the offsets from the patch centre to every anatomical landmark and names the
  landmark it is centred on (or none), which is the localisability Adam's anatomy expert is
  trained for. An exponential moving average of its weights is kept as DINO's `teacher` branch,
  and the checkpoint is written in Adam-v2's layout: {'student', 'teacher', 'epoch', 'args'} with
  `backbone.*` keys and a `head.*` that the adapter drops.

Each teacher is written atomically, then a `<teacher>.json` record beside it holds the settings
hash, the training curve and validation numbers. `teacher_is_current` compares that hash, so a
rerun skips a teacher that is already trained with the same settings on the same shards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch  # before tensorflow, always (docs/design.md, section 2)
import numpy as np

from leader.errors import LeaderError
from leader.io import atomic_write_bytes, atomic_write_json
from leader.shards.manifest import Manifest
from leader.shards.layout import iter_samples

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class DiseaseTeacherSettings:
    input_size: int = 128                  # the SavedModel resizes every PNG to this, as CXR-FM does
    widths: tuple = (24, 48, 96, 160)      # one stride-2 block per width: 128 px -> 8 x 8 x 160 maps
    epochs: int = 30                       # 20 epochs of widths 16-128 stopped at validation AUC 0.73, still climbing
    batch_size: int = 32
    lr: float = 3e-3
    train_views: int = 3                   # views rendered per training image (view 0 is the image)
    seed: int = 0
    threads: int = 2                       # fixed, so the weights do not follow the machine's core count


@dataclass(frozen=True)
class AnatomyTeacherSettings:
    arch: str = "test_resnet"              # timm's 0.37M-parameter ResNet (layers 1-1-1-1), 96-d pooled
    input_size: int = 64
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    patch_side: tuple = (0.12, 0.6)        # patch side as a fraction of the image side (landmark patches: 0.22)
    near_landmark: float = 0.5             # fraction of patches centred near a landmark, the rest anywhere
    ema: float = 0.99                      # DINO's teacher: an exponential moving average of the student
    seed: int = 0
    threads: int = 2                       # fixed, so the weights do not follow the machine's core count


def settings_hash(settings: DiseaseTeacherSettings | AnatomyTeacherSettings, shards_dir: str | Path) -> str:
    """What decides a teacher's weights: its settings and the shards' content (their manifest keys)."""
    manifest = Manifest.load(shards_dir)
    identity = {"kind": type(settings).__name__, "settings": asdict(settings),
                "shards": [(s.name, s.sha256) for s in manifest.shards]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()


def record_path(model_path: str | Path) -> Path:
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.split(".")[0] + ".json")


def teacher_is_current(model_path: str | Path, expected_hash: str) -> bool:
    record = record_path(model_path)
    if not (Path(model_path).exists() and record.exists()):
        return False
    return json.loads(record.read_text()).get("settings_sha256") == expected_hash


# ---------------------------------------------------------------------------------------------
# Training data: the shards' own images, labels and landmarks


@dataclass
class PhantomSplit:
    keys: list[str]
    images: np.ndarray                         # (N, H, W) uint8 or uint16, as stored
    labels: np.ndarray                         # (N, C) float 1/0/NaN
    landmarks: np.ndarray                      # (N, L, 2) stored-image pixels, NaN where absent
    label_names: list[str] = field(default_factory=list)
    landmark_names: list[str] = field(default_factory=list)


def load_split(shards_dir: str | Path, split: str) -> PhantomSplit:
    manifest = Manifest.load(shards_dir)
    labels_, landmark_names = manifest.label_names, manifest.landmark_names
    keys, images, labels, landmarks = [], [], [], []
    for sample in iter_samples(shards_dir):
        meta = sample.meta
        if meta["split"] != split:
            continue
        image = sample.image()
        if images and image.shape != images[0].shape:
            raise LeaderError(f"demo teachers need images of one size; {sample.key} is {image.shape}, "
                              f"{keys[0]} is {images[0].shape}")
        keys.append(sample.key)
        images.append(image)
        labels.append([np.nan if meta["labels"].get(n) is None else float(meta["labels"][n]) for n in labels_])
        marks = meta.get("landmarks") or {}
        landmarks.append([marks.get(n, (np.nan, np.nan)) for n in landmark_names])
    if not keys:
        raise LeaderError(f"{shards_dir} has no {split!r} samples to train a demo teacher on")
    return PhantomSplit(keys, np.stack(images), np.asarray(labels, np.float32).reshape(len(keys), len(labels_)),
                        np.asarray(landmarks, np.float64).reshape(len(keys), len(landmark_names), 2),
                        list(labels_), list(landmark_names))


def mean_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean ROC AUC over the classes that have both labels (unknown labels left out)."""
    from sklearn.metrics import roc_auc_score

    aucs = []
    for c in range(labels.shape[1]):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c]
        if y.min(initial=1) == 0 and y.max(initial=0) == 1:
            aucs.append(roc_auc_score(y, scores[known, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


# ---------------------------------------------------------------------------------------------
# The disease teacher (TensorFlow; its own process)


def _render_training_views(split: PhantomSplit, n_views: int, size: int, seed: int) -> np.ndarray:
    """(N, V, size, size, 1) float32: view 0 is the image, the others the paper's augmentations."""
    from leader.views import ViewSpec, replay_views, sample_view_params

    # Keys of their own, so these views are not the ones the cache will hold for the same images.
    params = sample_view_params(ViewSpec(), seed, [f"disease-teacher/{k}" for k in split.keys], n_views)
    images = torch.from_numpy(split.images)[:, None]
    views = [replay_views(images, params[:, v], size)[:, 0] for v in range(n_views)]
    return torch.stack(views, 1)[..., None].numpy()


def _disease_classifier(keras, settings: DiseaseTeacherSettings, n_classes: int):
    """(trunk, classifier): the trunk maps (B, S, S, 1) in [0, 1] to (B, S/16, S/16, D) feature maps."""
    inputs = keras.Input((settings.input_size, settings.input_size, 1), name="image")
    x = keras.layers.Rescaling(4.0, offset=-2.0)(inputs)          # [0, 1] -> about zero mean, unit spread
    for i, width in enumerate(settings.widths):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False, name=f"down{i}")(x)
        x = keras.layers.BatchNormalization(name=f"down{i}_bn")(x)
        x = keras.layers.ReLU()(x)
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"conv{i}_bn")(x)
        x = keras.layers.ReLU()(x)
    trunk = keras.Model(inputs, x, name="disease_trunk")
    pooled = keras.layers.GlobalAveragePooling2D()(trunk.output)  # the same mean pooling the adapter applies
    logits = keras.layers.Dense(n_classes, name="disease_logits")(keras.layers.Dropout(0.2)(pooled))
    return trunk, keras.Model(inputs, logits, name="disease_classifier")


def train_disease_teacher(shards_dir: str | Path, out_dir: str | Path, settings: DiseaseTeacherSettings,
                          on_progress: ProgressFn | None = None) -> dict:
    """Train on the train split's disease labels, export as a CXR Foundation v2 SavedModel; returns the record."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import keras

    from leader.precompute.teachers.cxr_foundation import export_cxr_foundation_savedmodel

    started = time.perf_counter()
    tf.config.threading.set_intra_op_parallelism_threads(settings.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(settings.seed)
    train, val = load_split(shards_dir, "train"), load_split(shards_dir, "val")
    train_views = _render_training_views(train, settings.train_views, settings.input_size, settings.seed)
    val_images = _render_training_views(val, 1, settings.input_size, settings.seed)[:, 0]
    trunk, classifier = _disease_classifier(keras, settings, len(train.label_names))

    def masked_bce(y_true, logits):
        known = tf.logical_not(tf.math.is_nan(y_true))
        y = tf.where(known, y_true, tf.zeros_like(y_true))
        per_label = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
        known = tf.cast(known, per_label.dtype)
        return tf.reduce_sum(per_label * known) / tf.maximum(tf.reduce_sum(known), 1.0)

    batches_per_epoch = math.ceil(len(train.keys) / settings.batch_size)
    total = settings.epochs * batches_per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(settings.lr, decay_steps=total, alpha=0.05)
    classifier.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4), loss=masked_bce)
    rng = np.random.default_rng(settings.seed)
    curve = []
    for epoch in range(settings.epochs):
        # Each epoch shows every training image once, in one of its views.
        pick = rng.integers(0, settings.train_views, len(train.keys))
        x = train_views[np.arange(len(train.keys)), pick]
        history = classifier.fit(x, train.labels, batch_size=settings.batch_size, epochs=1, shuffle=True, verbose=0)
        val_scores = classifier.predict(val_images, batch_size=128, verbose=0)
        curve.append({"epoch": epoch + 1, "train_loss": float(history.history["loss"][-1]),
                      "val_auc": mean_auc(val_scores, val.labels)})
        if on_progress is not None:
            on_progress(epoch + 1, settings.epochs)
    out_dir = export_cxr_foundation_savedmodel(trunk, out_dir, settings.input_size)
    record = {
        "teacher": "disease", "format": "CXR Foundation v2 SavedModel (serving_default: input_example -> feature_maps_0)",
        "path": str(out_dir), "settings": asdict(settings), "settings_sha256": settings_hash(settings, shards_dir),
        "learned_from": f"disease labels of {len(train.keys)} train images ({', '.join(train.label_names)})",
        "feature_maps": list(trunk.output.shape[1:]), "parameters": int(classifier.count_params()),
        "curve": curve, "final_train_loss": curve[-1]["train_loss"], "val_auc": curve[-1]["val_auc"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(record_path(out_dir), record)
    return record


# ---------------------------------------------------------------------------------------------
# The anatomy teacher (PyTorch, timm)


def anatomy_targets(centres: np.ndarray, sides: np.ndarray, landmarks: np.ndarray,
                    image_side: float) -> tuple[np.ndarray, np.ndarray]:
    """Where each patch lies: (offsets (B, 2L), landmark class (B,)).

    offsets: from the patch centre to every landmark, in units of the image side (a map of the
    body seen from the patch). class: the landmark within a quarter patch side of the centre
    (the nearest one if several), or L for "no landmark here".
    """
    delta = landmarks - centres[:, None, :]                         # (B, L, 2)
    distance = np.linalg.norm(delta, axis=-1)
    distance = np.where(np.isnan(distance), np.inf, distance)
    nearest = distance.argmin(axis=1)
    centred = distance[np.arange(len(centres)), nearest] <= sides / 4
    classes = np.where(centred, nearest, landmarks.shape[1])
    return np.nan_to_num(delta / image_side).reshape(len(centres), -1).astype(np.float32), classes


def sample_patches(split: PhantomSplit, batch: int, settings: AnatomyTeacherSettings,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image index (B,), centre (B, 2), side (B,)) in stored pixels."""
    n, height, width = split.images.shape
    side_px = rng.uniform(*settings.patch_side, batch) * max(height, width)
    index = rng.integers(0, n, batch)
    centres = np.stack([rng.uniform(0, width, batch), rng.uniform(0, height, batch)], 1)
    near = rng.random(batch) < settings.near_landmark
    which = rng.integers(0, split.landmarks.shape[1], batch)
    jitter = rng.normal(0.0, 0.12, (batch, 2)) * side_px[:, None]
    marked = split.landmarks[index, which] + jitter
    usable = near & np.isfinite(marked).all(axis=1)
    centres[usable] = marked[usable]
    return index, np.clip(centres, 0, [width - 1, height - 1]), side_px


def render_patches(split: PhantomSplit, index: np.ndarray, centres: np.ndarray, sides: np.ndarray,
                   size: int, photometric: np.ndarray) -> torch.Tensor:
    """Patches cut with crop_patch (the project's one way to cut), then their photometric views."""
    from leader.shards.crop import crop_patch
    from leader.views import replay_views

    boxes = np.concatenate([centres - sides[:, None] / 2, centres + sides[:, None] / 2], axis=1)
    crops = crop_patch(torch.from_numpy(split.images[index])[:, None], boxes, size)
    return replay_views(crops, photometric, size)


class AnatomyNet(torch.nn.Module):
    """A timm backbone pooled to features, and the localisation head (dropped when used as a teacher)."""

    def __init__(self, arch: str, n_landmarks: int):
        super().__init__()
        import timm

        self.backbone = timm.create_model(arch, pretrained=False, num_classes=0)
        self.head = torch.nn.Linear(self.backbone.num_features, 2 * n_landmarks + n_landmarks + 1)
        self.n_landmarks = n_landmarks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(self.backbone(x))
        return out[:, : 2 * self.n_landmarks], out[:, 2 * self.n_landmarks:]


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """As the adam adapter feeds its network: grayscale replicated to RGB, ImageNet mean/std."""
    from leader.precompute.teachers.timm_teacher import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean) / std


def _anatomy_loss(net: torch.nn.Module, pixels: torch.Tensor, offsets: torch.Tensor,
                  classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    predicted_offsets, logits = net(_normalise(pixels))
    regression = torch.nn.functional.smooth_l1_loss(predicted_offsets, offsets, beta=0.05)
    classification = torch.nn.functional.cross_entropy(logits, classes)
    return regression + 0.2 * classification, regression, logits


def landmark_patch_accuracy(net: AnatomyNet, split: PhantomSplit, settings: AnatomyTeacherSettings,
                            side_fraction: float = 224 / 1024) -> tuple[float, float]:
    """(accuracy naming the landmark, mean offset error in image sides) on patches centred on landmarks."""
    n, height, width = split.images.shape
    index, which = np.nonzero(np.isfinite(split.landmarks).all(axis=-1))
    centres = split.landmarks[index, which]
    sides = np.full(len(index), side_fraction * max(height, width))
    offsets, _ = anatomy_targets(centres, sides, split.landmarks[index], float(max(height, width)))
    from leader.views import IDENTITY

    identity = np.repeat(IDENTITY[None], len(index), 0)
    net.eval()
    with torch.inference_mode():
        predicted, logits = net(_normalise(render_patches(split, index, centres, sides, settings.input_size, identity)))
    accuracy = float((logits.argmax(1).numpy() == which).mean())
    error = float(np.linalg.norm((predicted.numpy() - offsets).reshape(len(index), -1, 2), axis=-1).mean())
    return accuracy, error


def train_anatomy_teacher(shards_dir: str | Path, out_path: str | Path, settings: AnatomyTeacherSettings,
                          on_progress: ProgressFn | None = None) -> dict:
    """Train on anatomy alone (patch position), save in Adam-v2's checkpoint layout; returns the record."""
    from leader.views import ViewSpec, sample_view_params

    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    train, val = load_split(shards_dir, "train"), load_split(shards_dir, "val")
    if np.isnan(train.landmarks).all():
        raise LeaderError(f"{shards_dir} has no landmarks in its train split; the anatomy teacher learns from them")
    image_side = float(max(train.images.shape[1:]))
    n_landmarks = train.landmarks.shape[1]
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        net = AnatomyNet(settings.arch, n_landmarks)
        ema = AnatomyNet(settings.arch, n_landmarks)
    ema.load_state_dict(net.state_dict())
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=0.05)
    photometric_only = ViewSpec(rotation_deg=0.0, translate=0.0, scale=(1.0, 1.0), shear_deg=0.0, hflip_p=0.0)
    rng = np.random.default_rng(settings.seed)
    curve, running = [], []
    net.train()
    for step in range(settings.steps):
        lr = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index, centres, sides = sample_patches(train, settings.batch_size, settings, rng)
        # View 0 of sample_view_params is the identity, so ask for two views and use the second.
        params = sample_view_params(photometric_only, settings.seed, [f"anatomy-teacher/{step}/{i}" for i in range(len(index))], 2)[:, 1]
        pixels = render_patches(train, index, centres, sides, settings.input_size, params)
        offsets, classes = anatomy_targets(centres, sides, train.landmarks[index], image_side)
        loss, regression, _ = _anatomy_loss(net, pixels, torch.from_numpy(offsets), torch.from_numpy(classes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for mine, average in zip(net.state_dict().values(), ema.state_dict().values()):
                if average.is_floating_point():
                    average.mul_(settings.ema).add_(mine.detach(), alpha=1 - settings.ema)
                else:
                    average.copy_(mine)
        running.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            curve.append({"step": step + 1, "train_loss": float(np.mean(running))})
            running = []
        if on_progress is not None:
            on_progress(step + 1, settings.steps)
    accuracy, error = landmark_patch_accuracy(ema, val, settings)
    checkpoint = {
        "student": {f"module.{k}": v.clone() for k, v in net.state_dict().items()},   # saved as DDP wraps it
        "teacher": {k: v.clone() for k, v in ema.state_dict().items()},
        "epoch": settings.steps, "args": {"arch": settings.arch, "input_size": settings.input_size, "demo": True},
    }
    import io

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(out_path, buffer.getvalue())
    record = {
        "teacher": "anatomy", "format": "Adam-v2 checkpoint ({'student','teacher','epoch','args'}, backbone.* + head.*)",
        "path": str(out_path), "arch": settings.arch, "settings": asdict(settings),
        "settings_sha256": settings_hash(settings, shards_dir),
        "learned_from": (f"patch positions in {len(train.keys)} train images: offsets to the {n_landmarks} landmarks "
                         "and the landmark a patch is centred on; no disease label"),
        "parameters": int(sum(p.numel() for p in net.backbone.parameters())),
        "curve": curve, "final_train_loss": curve[-1]["train_loss"],
        "val_landmark_accuracy": accuracy, "val_offset_error": error,
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(record_path(out_path), record)
    return record


# ---------------------------------------------------------------------------------------------
# Training the same bits on any x86-64 machine

# The kernels the frameworks pick follow the CPU's vector width (AVX-512 here, AVX2 or AVX-512
# elsewhere), and with them the order of each sum: on one AMD EPYC, capping these three libraries at
# AVX2 changed both teachers' weights, and so did one thread instead of two. Every x86-64 CPU since
# 2013 (Intel Haswell, AMD Zen) runs the AVX2 kernels, so the teachers train with them, in a fresh
# process, since each library reads its setting once, when it first runs.
PINNED_X86_KERNELS = {
    "ATEN_CPU_CAPABILITY": "avx2",        # PyTorch's own vectorised kernels
    "ONEDNN_MAX_CPU_ISA": "AVX2",         # oneDNN, under both PyTorch's and TensorFlow's convolutions
    "MKL_CBWR": "AVX2",                   # MKL's conditional numerical reproducibility
}


def pinned_environment(threads: int) -> dict[str, str]:
    """The environment variables a teacher trains under: its thread count, and on x86-64 the AVX2 kernels."""
    import platform

    pinned = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if platform.machine().lower() in ("x86_64", "amd64"):
        pinned.update(PINNED_X86_KERNELS)
    return pinned


def train_in_pinned_process(train: Callable, shards_dir: str | Path, out: str | Path, settings) -> dict:
    """`train(shards_dir, out, settings)` in a fresh process under pinned_environment; returns its record.

    A failure there comes back as the same exception. Progress is not reported across the process
    boundary; the record holds the curve.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pinned = pinned_environment(settings.threads)
    saved = {k: os.environ.get(k) for k in pinned}
    os.environ.update(pinned)                      # a spawned process starts from the parent's environment
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        future = pool.submit(train, str(shards_dir), str(out), settings)   # the process starts here
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with pool:
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise LeaderError(f"the {type(settings).__name__.removesuffix('Settings')} process died before it "
                              f"finished (killed, or out of memory): {e}") from e


# ---------------------------------------------------------------------------------------------
# Settings from the command line (`leader demo teacher disease --set epochs=2 --set widths=[8,16,32,32]`)


def settings_from_pairs(cls, pairs: list[str]):
    """The teacher's settings with `key=value` overrides (values read as YAML: numbers, lists)."""
    from leader.runtime import parse_key_values

    values = parse_key_values(pairs, flag="--set")
    unknown = sorted(set(values) - set(cls.__dataclass_fields__))
    if unknown:
        raise LeaderError(f"{cls.__name__}: unknown setting(s) {unknown}; known: {', '.join(cls.__dataclass_fields__)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
