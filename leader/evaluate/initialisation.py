"""What a fine-tuned network starts from: a backbone, its timm architecture and its input.

    source = backbone_source("run:runs/demo/students/student")          # the student's backbone
    source = backbone_source("timm:resnet50:imagenet.pth")       # any timm model, a local checkpoint
    source = backbone_source("timm:resnet50")                    # the same architecture, random weights
    source = backbone_source("export:exports/swinb")             # a `leader export` folder
    source = backbone_source("adam:adam_v2.pth")                 # the anatomy teacher's checkpoint
    source = backbone_source("random:run:runs/demo/students/student")   # the student's architecture, random weights
    net = source.build()                                          # a fresh copy: (B, C, S, S) -> (B, num_features)

Classification fine-tuning puts a linear head on `build()`; segmentation builds a UperNet whose
encoder is the same timm architecture (`arch`, `kwargs`) and copies `build()`'s weights into it.
Every checkpoint is read from a local file with `torch.load(weights_only=True)` or safetensors;
nothing is fetched from a hub.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from torch import nn

from leader.errors import LeaderError
from leader.network_input import IMAGENET_MEAN, IMAGENET_STD, normalise_input

FORMS = "run:RUN, export:DIR, timm:ARCH[:CHECKPOINT], adam:CHECKPOINT[:ARCH] or random:<one of these>"


@dataclass
class BackboneSource:
    """How to build a fresh copy of the starting backbone, and what input it expects."""

    name: str
    build: Callable[[], nn.Module]           # -> a module mapping (B, C, S, S) to (B, num_features)
    image_size: int
    in_chans: int = 3
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    arch: str = ""                           # the timm architecture `build` creates
    kwargs: dict = field(default_factory=dict)   # its timm.create_model arguments besides num_classes, in_chans
    pretrained: bool = True                  # False: `build` gives random weights

    def normalise(self, pixels):
        """(B, 1, S, S) in [0, 1] -> backbone input (grayscale replicated, or one channel)."""
        return normalise_input(pixels, self.in_chans, self.mean, self.std)


def backbone_source(spec: str, image_size: int | None = None) -> BackboneSource:
    """A starting point by name (see the module's examples)."""
    kind, _, rest = spec.partition(":")
    if kind == "random" and rest:
        inner = backbone_source(rest, image_size)
        arch, kwargs, in_chans = inner.arch, dict(inner.kwargs), inner.in_chans

        def build_random() -> nn.Module:
            return create_timm(arch, kwargs, in_chans, spec)

        return BackboneSource(f"random:{inner.name}", build_random, inner.image_size, inner.in_chans, inner.mean,
                              inner.std, arch, kwargs, pretrained=False)
    if kind == "timm" and rest:
        arch, _, checkpoint = rest.partition(":")
        return timm_source(arch, checkpoint or None, image_size or 224)
    if kind == "run" and rest:
        return run_source(rest, image_size)
    if kind == "export" and rest:
        return export_source(rest, image_size)
    if kind == "adam" and rest:
        checkpoint, _, arch = rest.partition(":")
        return adam_source(checkpoint, arch or None, image_size or 224)
    raise LeaderError(f"fine-tuning starts from {FORMS}; got {spec!r} (a teacher's cached embeddings cannot be "
                      "fine-tuned)")


def create_timm(arch: str, kwargs: dict, in_chans: int, where: str) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        raise LeaderError(f"{where}: timm has no model {arch!r}: {e}") from None
    except TypeError as e:
        raise LeaderError(f"{where}: arguments {kwargs} do not fit timm model {arch!r}: {e}") from None


def _weights_source(name: str, arch: str, kwargs: dict, in_chans: int, state: dict | None, image_size: int,
                    mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD) -> BackboneSource:
    """A timm architecture with a state dict loaded strictly (None: random weights)."""
    from leader.precompute.teachers.checkpoints import load_backbone

    def build() -> nn.Module:
        net = create_timm(arch, kwargs, in_chans, name)
        if state is not None:
            load_backbone(net, state, name)
        return net

    return BackboneSource(name, build, image_size, in_chans, tuple(mean), tuple(std), arch, dict(kwargs),
                          pretrained=state is not None)


def timm_source(arch: str, checkpoint: str | None, image_size: int) -> BackboneSource:
    from leader.precompute.teachers.checkpoints import read_checkpoint, strip_prefix, unwrap_state_dict

    state = None
    if checkpoint:
        path = Path(checkpoint)
        if not path.is_file():
            raise LeaderError(f"fine-tuning: checkpoint {checkpoint} not found")
        state = strip_prefix(unwrap_state_dict(read_checkpoint(path), repr(checkpoint)), "module.")
    name = f"timm:{arch}" + (f":{checkpoint}" if checkpoint else "")
    return _weights_source(name, arch, {}, 3, state, image_size)


def run_source(run_dir: str, image_size: int | None) -> BackboneSource:
    if not Path(run_dir).is_dir():
        raise LeaderError(f"fine-tuning: run directory {run_dir} not found")
    from leader.train.checkpoint import Checkpoint
    from leader.train.config import config_from_dict
    from leader.train.embed import load_student

    student, student_input, _ = load_student(run_dir, device="cpu")
    weights = copy.deepcopy(student.backbone.state_dict())
    model = config_from_dict(Checkpoint.load(run_dir).config).model

    def build() -> nn.Module:
        net = copy.deepcopy(student.backbone)
        net.load_state_dict(weights)
        return net

    return BackboneSource(f"run:{run_dir}", build, image_size or student_input.image_size, student_input.in_chans,
                          tuple(student_input.mean), tuple(student_input.std), model.name, dict(model.kwargs))


def export_source(export_dir: str, image_size: int | None) -> BackboneSource:
    """A `leader export` folder: config.json (architecture, model_args, input) + model.safetensors."""
    from leader.precompute.teachers.checkpoints import read_checkpoint

    folder = Path(export_dir)
    config_file, weights = folder / "config.json", folder / "model.safetensors"
    if not config_file.is_file() or not weights.is_file():
        raise LeaderError(f"fine-tuning: {export_dir} is not a `leader export` folder (config.json and model.safetensors)")
    config = json.loads(config_file.read_text())
    kwargs = dict(config.get("model_args", {}))
    in_chans = int(kwargs.pop("in_chans", 3))
    input_cfg = config.get("pretrained_cfg", {})
    mean, std = input_cfg.get("mean", IMAGENET_MEAN), input_cfg.get("std", IMAGENET_STD)
    if len(mean) == 1:                          # a one-channel export stores the channel means
        mean, std = (mean[0],) * 3, (std[0],) * 3
    size = image_size or int(input_cfg.get("input_size", [in_chans, 224, 224])[-1])
    return _weights_source(f"export:{export_dir}", config["architecture"], kwargs, in_chans,
                           dict(read_checkpoint(weights)), size, tuple(mean), tuple(std))


def adam_source(checkpoint: str, arch: str | None, image_size: int) -> BackboneSource:
    """The anatomy teacher's checkpoint (Adam v1 or v2 layout), unwrapped by the `adam` teacher itself."""
    from leader.precompute.teachers import create_teacher

    teacher = create_teacher("adam", model=checkpoint, **({"arch": arch} if arch else {}))
    state, arch = teacher.net.state_dict(), teacher.arch
    teacher.close()
    return _weights_source(f"adam:{checkpoint}", arch, {}, 3, state, image_size)
