"""Tiny teacher files in the real formats, written from scratch for tests and the demo's test.

    from tests.teacher_fixtures import make_adam_v2_convnext_checkpoint
    path = make_adam_v2_convnext_checkpoint(tmp_path / "adam_v2.pth")

Each builder writes what the real release looks like on disk, not what our loaders would like:
ResNet weights come from torchvision (the names MoCo checkpoints carry), ConvNeXt weights are named
as in the official facebookresearch/ConvNeXt repository (built here from that architecture, not by
inverting our key mapping), DINO and MoCo wrappers carry their heads, queues and DDP prefixes, and
the TFRecords are written by TensorFlow itself. Weights are random but fixed by `seed`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch  # before tensorflow, always (docs/design.md, section 2)
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# convnext_atto's widths and depths: the smallest ConvNeXt timm names.
ATTO_DIMS = (40, 80, 160, 320)
ATTO_DEPTHS = (2, 2, 6, 2)


def make_cxr_foundation_savedmodel(out_dir: str | Path, *, dim: int = 16, input_size: int = 32, seed: int = 0,
                                   wrap=None) -> Path:
    """A CXR Foundation v2 look-alike: serving_default(input_example) -> feature_maps_0 (B, s/4, s/4, dim).

    The backbone is a two-layer Keras conv net with seeded random weights (non-zero biases, so a
    wrong pooling or scale shows), wrapped by the project's own exporter. wrap(backbone) -> another
    TF callable puts extra ops into the serving function (the SavedModel gate's tests).
    """
    from leader.precompute.teachers.cxr_foundation import export_cxr_foundation_savedmodel

    backbone = tiny_cxr_backbone(dim, input_size, seed)
    return export_cxr_foundation_savedmodel(wrap(backbone) if wrap else backbone, out_dir, input_size)


def tiny_cxr_backbone(dim: int, input_size: int, seed: int):
    """(B, s, s, 1) images -> (B, s/4, s/4, dim) feature maps: two strided convs, seeded random weights."""
    import keras

    def init(offset: int) -> keras.initializers.Initializer:
        return keras.initializers.RandomNormal(stddev=0.5, seed=seed * 10 + offset)

    inputs = keras.Input((input_size, input_size, 1))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu",
                            kernel_initializer=init(0), bias_initializer=init(1))(inputs)
    x = keras.layers.Conv2D(dim, 3, strides=2, padding="same", kernel_initializer=init(2), bias_initializer=init(3))(x)
    return keras.Model(inputs, x, name="tiny_cxr_backbone")


def torchvision_resnet_state(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision ResNet's state dict, without its classifier `fc`."""
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = getattr(torchvision.models, arch)()
        # Non-trivial BatchNorm statistics, so that eval mode (running stats) differs from train mode.
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}


def _moco_projection(width: int, out: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """MoCo-v2's MLP that replaces the ResNet fc: fc.0 Linear(width, width), ReLU, fc.2 Linear(width, out)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {"fc.0.weight": torch.randn(width, width, generator=g) * 0.01, "fc.0.bias": torch.zeros(width),
            "fc.2.weight": torch.randn(out, width, generator=g) * 0.01, "fc.2.bias": torch.zeros(out)}


def make_adam_v1_checkpoint(path: str | Path, *, arch: str = "resnet18", layout: str = "moco", seed: int = 0) -> Path:
    """Adam-v1: a MoCo-v2 ResNet with torchvision names.

    layout "moco": {"epoch", "arch", "state_dict": {module.encoder_q.*, module.encoder_k.*,
    module.queue, module.queue_ptr}}, as MoCo's training script saves it. layout "encoder_q": the
    query encoder alone at the top level, encoder_q.* with its fc.0/fc.2 MLP.
    """
    backbone = torchvision_resnet_state(arch, seed)
    width = _pooled_width(backbone)
    encoder = {**backbone, **_moco_projection(width, seed=seed)}
    if layout == "moco":
        state = {f"module.encoder_q.{k}": v for k, v in encoder.items()}
        state.update({f"module.encoder_k.{k}": v + 0.01 for k, v in encoder.items() if v.is_floating_point()})
        state["module.queue"] = torch.randn(128, 16)
        state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
        checkpoint: dict = {"epoch": 200, "arch": arch, "state_dict": state}
    elif layout == "encoder_q":
        checkpoint = {f"encoder_q.{k}": v for k, v in encoder.items()}
    else:
        raise ValueError(f"unknown Adam-v1 layout {layout!r}")
    return _save(checkpoint, path)


def make_adam_v2_resnet_checkpoint(path: str | Path, *, arch: str = "resnet18", seed: int = 0) -> Path:
    """Adam-v2 on a ResNet: DINO's {"student", "teacher", ...} with backbone.* and head.* keys.

    The student is saved as DDP wraps it (module. prefix); the teacher is not wrapped. They differ,
    so a test can tell which branch was loaded.
    """
    teacher = torchvision_resnet_state(arch, seed)
    student = {k: v + 0.05 if v.is_floating_point() else v for k, v in teacher.items()}
    head = _dino_head(_pooled_width(teacher), seed)
    return _save({
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **{f"head.{k}": v for k, v in head.items()}},
        "epoch": 100, "args": {"arch": arch},
    }, path)


def facebook_convnext_state(dims: tuple[int, ...] = ATTO_DIMS, depths: tuple[int, ...] = ATTO_DEPTHS,
                            seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A ConvNeXt backbone state dict with the official repository's names and shapes.

    downsample_layers.0 is the stem (Conv 4x4/4, LayerNorm); downsample_layers.i>0 are
    (LayerNorm, Conv 2x2/2); stages.i.j blocks hold dwconv (7x7 depthwise), norm, pwconv1/pwconv2
    (Linear) and the layer scale gamma; `norm` is the LayerNorm after pooling. No classifier
    `head`: DINO replaces it. device="meta" gives shapes only (for real-size key checks).
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1 + rand(width), f"{prefix}.bias": rand(width)}

    state = {"downsample_layers.0.0.weight": rand(dims[0], 3, 4, 4), "downsample_layers.0.0.bias": rand(dims[0]),
             **norm("downsample_layers.0.1", dims[0])}
    for i in range(1, len(dims)):
        state.update(norm(f"downsample_layers.{i}.0", dims[i - 1]))
        state[f"downsample_layers.{i}.1.weight"] = rand(dims[i], dims[i - 1], 2, 2)
        state[f"downsample_layers.{i}.1.bias"] = rand(dims[i])
    for i, (width, depth) in enumerate(zip(dims, depths)):
        for j in range(depth):
            p = f"stages.{i}.{j}"
            state.update({
                f"{p}.gamma": rand(width, scale=0.5),
                f"{p}.dwconv.weight": rand(width, 1, 7, 7), f"{p}.dwconv.bias": rand(width),
                **norm(f"{p}.norm", width),
                f"{p}.pwconv1.weight": rand(4 * width, width), f"{p}.pwconv1.bias": rand(4 * width),
                f"{p}.pwconv2.weight": rand(width, 4 * width), f"{p}.pwconv2.bias": rand(width),
            })
    state.update(norm("norm", dims[-1]))
    return state


def make_adam_v2_convnext_checkpoint(path: str | Path, *, dims: tuple[int, ...] = ATTO_DIMS,
                                     depths: tuple[int, ...] = ATTO_DEPTHS, seed: int = 0) -> Path:
    """Adam-v2 on a ConvNeXt (convnext_atto's size by default), facebook key names, DINO wrapper."""
    teacher = facebook_convnext_state(dims, depths, seed)
    student = facebook_convnext_state(dims, depths, seed + 100)
    head = _dino_head(dims[-1], seed)
    return _save({
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **{f"module.head.{k}": v for k, v in head.items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **{f"head.{k}": v for k, v in head.items()}},
        "epoch": 100, "args": {"arch": "convnext"},
    }, path)


def random_embeddings(image_ids: list[str], dim: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {image_id: rng.standard_normal(dim).astype(np.float32) for image_id in image_ids}


def make_import_npy_dir(out_dir: str | Path, embeddings: dict[str, np.ndarray]) -> Path:
    """One `<image stem>.npy` (1-D) per image, as the official LeADER code reads them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, vector in embeddings.items():
        np.save(out_dir / f"{stem}.npy", vector)
    return out_dir


def make_import_npz_dir(out_dir: str | Path, embeddings: dict[str, np.ndarray], key: str = "embedding") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stem, vector in embeddings.items():
        np.savez(out_dir / f"{stem}.npz", **{key: vector})
    return out_dir


def make_import_tfrecord_dir(out_dir: str | Path, embeddings: dict[str, np.ndarray]) -> Path:
    """PhysioNet's MIMIC-CXR layout: files/pXX/p<subject>/s<study>/<dicom_id>.tfrecord, written by TF.

    Each file holds one tf.train.Example with the float_list `embedding` and, as the release does,
    the image id as bytes.
    """
    import tensorflow as tf

    out_dir = Path(out_dir)
    for n, (dicom_id, vector) in enumerate(embeddings.items()):
        subject = 10000032 + n
        folder = out_dir / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{50000000 + n}"
        folder.mkdir(parents=True, exist_ok=True)
        example = tf.train.Example(features=tf.train.Features(feature={
            "image/id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[dicom_id.encode()])),
            "embedding": tf.train.Feature(float_list=tf.train.FloatList(value=vector.tolist())),
        }))
        with tf.io.TFRecordWriter(str(folder / f"{dicom_id}.tfrecord")) as writer:
            writer.write(example.SerializeToString())
    return out_dir


def _pooled_width(resnet_state: dict[str, torch.Tensor]) -> int:
    last_block = max(k for k in resnet_state if k.startswith("layer4.") and k.endswith(".weight") and ".bn" in k)
    return resnet_state[last_block].shape[0]


def _dino_head(width: int, seed: int) -> dict[str, torch.Tensor]:
    """DINO's projection head: a 3-layer MLP, then a weight-normed last layer (dropped by the loader)."""
    g = torch.Generator().manual_seed(seed + 7)
    return {"mlp.0.weight": torch.randn(64, width, generator=g), "mlp.0.bias": torch.zeros(64),
            "mlp.2.weight": torch.randn(64, 64, generator=g), "mlp.2.bias": torch.zeros(64),
            "mlp.4.weight": torch.randn(32, 64, generator=g), "mlp.4.bias": torch.zeros(32),
            "last_layer.weight_g": torch.ones(256, 1), "last_layer.weight_v": torch.randn(256, 32, generator=g)}


def _save(checkpoint: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path
