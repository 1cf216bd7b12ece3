"""A UperNet whose encoder is a fine-tuning starting point: the student, an export, a timm model.

    model, encoder = build_upernet(backbone_source("run:runs/demo/students/student"), classes=1, size=448)
    encoder["loaded"]                     # every encoder tensor, copied from the student's backbone

The decoder is segmentation-models-pytorch's UPerNet (PPM + FPN, `decoder_channels` wide), the
maintained implementation, over its `tu-` encoder: timm's own model of the same architecture,
built with `features_only` (smp adds the missing stride-2 level for Swin-like models and turns
NHWC features into NCHW). The library is asked for no weights (`encoder_weights=None`: nothing
comes from a hub). The starting point's weights are copied in here instead, because timm's
feature wrapper loads non-strictly and only logs what is missing: a silently random encoder would
be a wrong result. Every encoder tensor must find its backbone tensor of the same shape, or the
build stops naming the first ones that did not. The backbone tensors the encoder has no use for
(the norm after global pooling of ConvNeXt and Swin) are listed in the result.

Input size: any multiple of 32 (smp's requirement), including one the student was not trained at
(this lab segments at 448 px); models with a patch embedding that checks its input size (Swin,
ViT) are built for it with `img_size`.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from leader.errors import LeaderError
from leader.evaluate.initialisation import BackboneSource

SIDE_MULTIPLE = 32


def build_upernet(source: BackboneSource, classes: int, size: int, decoder_channels: int = 256) -> tuple[nn.Module, dict]:
    """(UPerNet with `classes` output channels at `size` px, what was loaded into its encoder)."""
    import segmentation_models_pytorch as smp

    if size % SIDE_MULTIPLE or size < SIDE_MULTIPLE:
        raise LeaderError(f"segmentation --size {size}: UperNet needs a multiple of {SIDE_MULTIPLE} "
                          f"(e.g. {max(SIDE_MULTIPLE, round(size / SIDE_MULTIPLE) * SIDE_MULTIPLE)})")
    backbone = source.build()
    kwargs = dict(source.kwargs)
    if getattr(getattr(backbone, "patch_embed", None), "img_size", None) is not None:
        kwargs["img_size"] = size                  # Swin and ViT check their input size strictly
    try:
        model = smp.UPerNet(encoder_name=f"tu-{source.arch}", encoder_weights=None, in_channels=source.in_chans,
                            classes=classes, decoder_channels=decoder_channels, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise LeaderError(f"segmentation: smp cannot build a UperNet on timm {source.arch!r} ({kwargs}): {e}") from None
    report = {"arch": source.arch, "weights": "random", "loaded": 0, "unused_backbone_keys": []}
    if source.pretrained:
        unused = load_encoder(model.encoder.model, backbone.state_dict(), source.name)
        report.update(weights=source.name, loaded=len(model.encoder.model.state_dict()), unused_backbone_keys=unused)
    return model, report


def backbone_names(encoder_key: str) -> Iterator[str]:
    """Where an encoder tensor lives in the plain backbone: timm's feature wrappers rename modules.

    FeatureListNet flattens a top-level Sequential (`stages.0.x` becomes `stages_0.x`);
    FeatureGetterNet keeps the whole model under `model.`.
    """
    yield encoder_key
    if encoder_key.startswith("model."):
        yield encoder_key[len("model."):]
    head, _, rest = encoder_key.partition(".")
    if "_" in head and rest:
        parent, _, index = head.rpartition("_")
        if index.isdigit():
            yield f"{parent}.{index}.{rest}"


def load_encoder(encoder: nn.Module, backbone_state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy a backbone's weights into a features-only encoder; every encoder tensor must arrive.

    Returns the backbone keys the encoder does not use. Raises LeaderError for an encoder tensor
    without a counterpart or with another shape.
    """
    expected = encoder.state_dict()
    mapped, used, missing, wrong = {}, set(), [], []
    for key, tensor in expected.items():
        found = next((name for name in backbone_names(key) if name in backbone_state), None)
        if found is None:
            missing.append(key)
        elif backbone_state[found].shape != tensor.shape:
            wrong.append(f"{key} {tuple(backbone_state[found].shape)} vs {tuple(tensor.shape)}")
        else:
            mapped[key] = backbone_state[found]
            used.add(found)
    if missing or wrong:
        problems = ([f"{len(missing)} encoder weights have no backbone weight ({_preview(missing)})"] if missing else []) \
            + ([f"{len(wrong)} have another shape ({_preview(wrong)})"] if wrong else [])
        raise LeaderError(f"segmentation: the weights of {source} do not fill the UperNet encoder: " + "; ".join(problems)
                          + "; refusing to train a partly random encoder")
    encoder.load_state_dict(mapped, strict=True)
    arrived = encoder.state_dict()
    if not all(torch.equal(arrived[k], v.to(arrived[k].dtype)) for k, v in mapped.items()):
        raise LeaderError(f"segmentation: the encoder does not hold the weights of {source} after loading them")
    return sorted(set(backbone_state) - used)


def _preview(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")
