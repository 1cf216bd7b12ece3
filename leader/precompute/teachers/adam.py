"""`adam`: the anatomy expert, from Adam-v1 (MoCo-v2) or Adam-v2 (DINO-style) checkpoints.

    create_teacher("adam", model="adam_v2_convnext.pth", device="cuda")

Checkpoint layouts (docs/design.md, section 6):

- v1, MoCo-v2 ResNet-50: the query encoder `encoder_q.*` with torchvision names and a projection MLP
  `fc.0`/`fc.2`, at the top level or under `state_dict` with DDP's `module.` prefix, next to the
  key encoder `encoder_k.*` and the negatives `queue`. Only the query encoder is kept; the MLP is
  dropped because the embedding is the pooled backbone feature.
- v2, DINO-style ConvNeXt-B or ResNet-50: `{"student": ..., "teacher": ..., ...}` with `backbone.*`
  and a projection `head.*`. The `teacher` branch is used by default: in DINO the teacher is the
  exponential moving average of the student, is the network the method evaluates, and gives the
  better features; `branch="student"` picks the other. ConvNeXt keys use the official repository's
  names and are renamed to timm's.

The architecture is inferred from the keys (`layer1.*`: resnet50; `stages.*`: convnext_base);
`arch=` overrides it for other depths or widths. Preprocessing and pooling are `TimmTeacher`'s:
224 px, ImageNet mean/std, grayscale replicated to 3 channels, eval mode.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from leader.errors import LeaderError
from leader.precompute.teachers import register_teacher
from leader.precompute.teachers.checkpoints import (
    StateDict, convnext_facebook_to_timm, is_facebook_convnext, is_state_dict, select_prefix,
    strip_prefix, unwrap_state_dict)
from leader.precompute.teachers.timm_teacher import TimmTeacher

_DINO_BRANCHES = ("teacher", "student")
_MOCO_BOOKKEEPING = ("encoder_k.", "queue")   # the key encoder and the queue of negatives


@register_teacher("adam")
class AdamTeacher(TimmTeacher):
    kind = "adam"

    def __init__(self, model: str | Path | None, device: str = "cpu", allow_remote: bool = False,
                 arch: str | None = None, input_size: int = 224, branch: str = "teacher"):
        if branch not in _DINO_BRANCHES:
            raise LeaderError(f"teacher 'adam': branch must be one of {', '.join(_DINO_BRANCHES)}, got {branch!r}")
        self.branch = branch
        super().__init__(model, device=device, allow_remote=allow_remote, arch=arch, input_size=input_size)

    def backbone_state(self, checkpoint: object, source: str) -> tuple[StateDict, str, tuple[str, ...]]:
        if isinstance(checkpoint, Mapping) and any(b in checkpoint for b in _DINO_BRANCHES):
            state, layout = self._dino_backbone(checkpoint, source), f"adam-v2 (DINO {self.branch})"
        else:
            state, layout = self._moco_query_encoder(checkpoint, source), "adam-v1 (MoCo-v2 encoder_q)"
        if is_facebook_convnext(state):
            state, layout = convnext_facebook_to_timm(state), layout + ", ConvNeXt keys renamed to timm"
        return state, layout, ()

    def choose_arch(self, arch: str | None, state: StateDict, source: str) -> str:
        if arch:
            return arch
        if any(k.startswith("layer1.") for k in state):
            return "resnet50"
        if any(k.startswith("stages.") for k in state):
            return "convnext_base"
        raise LeaderError(f"teacher 'adam': cannot tell the architecture of {source} from its keys "
                          f"(no layer1.* or stages.*); pass the timm name (option arch)")

    def _dino_backbone(self, checkpoint: Mapping, source: str) -> StateDict:
        if self.branch not in checkpoint:
            present = ", ".join(b for b in _DINO_BRANCHES if b in checkpoint)
            raise LeaderError(f"Adam-v2 checkpoint {source} has no {self.branch!r} branch (it has: {present}); option branch")
        branch = checkpoint[self.branch]
        state = strip_prefix(dict(branch) if is_state_dict(branch) else unwrap_state_dict(branch, source), "module.")
        stray = sorted(k for k in state if not k.startswith(("backbone.", "head.")))
        if stray:
            raise LeaderError(f"Adam-v2 checkpoint {source}: {self.branch!r} has keys outside backbone.*/head.*: {', '.join(stray[:6])}")
        backbone = select_prefix(state, "backbone.")
        if not backbone:
            raise LeaderError(f"Adam-v2 checkpoint {source}: {self.branch!r} has no backbone.* keys")
        return backbone

    def _moco_query_encoder(self, checkpoint: object, source: str) -> StateDict:
        state = strip_prefix(unwrap_state_dict(checkpoint, source), "module.")
        if not any(k.startswith("encoder_q.") for k in state):
            return state   # the query encoder was already extracted: torchvision names at the top level
        stray = sorted(k for k in state if not k.startswith(("encoder_q.",) + _MOCO_BOOKKEEPING))
        if stray:
            raise LeaderError(f"Adam-v1 checkpoint {source} has keys outside encoder_q/encoder_k/queue: {', '.join(stray[:6])}")
        return select_prefix(state, "encoder_q.")
