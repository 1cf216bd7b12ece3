"""The sizes of a benchmark run: data, models, batch, repetitions. One profile per kind of run.

On the CPU the models are small, so the suite fits a 2-core machine; on CUDA they are the paper's
(student Swin-B at 224, anatomy teacher ResNet-50 at 224, disease teacher EfficientNet-L2). Within a
run, every ratio compares two ways of doing the same work with these same settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from leader.errors import LeaderError


@dataclass(frozen=True)
class ModelSpec:
    """A timm network with random weights; timing does not depend on the weights."""

    arch: str
    input_size: int | None = None       # teachers: None = the stored size (CXR-FM resizes nothing client-side)
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Profile:
    name: str
    original_size: int                  # side of the original images (what the official code decodes)
    stored_size: int                    # shards' --size (what our loader decodes)
    distinct_images: int                # phantom renders; the folder repeats them (rendering is not what is timed)
    build_images: int                   # images in the folder the shard-build benchmark reads
    build_workers: tuple[int, ...]
    train_images: int                   # images in the shard set the training benchmarks stream
    shard_size: int
    n_views: int                        # cached views per item
    batch_size: int
    student: ModelSpec
    disease: ModelSpec
    anatomy: ModelSpec
    loader_workers: tuple[int, ...]     # DataLoader workers compared in the loader benchmark
    pipeline_workers: int               # workers of the full training pipeline (overhead benchmark)
    warmup_steps: int
    timed_steps: int
    precompute_batch: int
    scale_items: tuple[int, ...]        # manifest sizes for the host-memory benchmark
    row_reads: int                      # single-row reads timed in the cache-cost benchmark
    overhead_epochs: int = 3            # epochs the overhead benchmark streams through the pipeline
    overhead_sweep: tuple[tuple[int, bool], ...] = ()   # more (workers, pinned memory) pipelines to time
    loader_batch: int | None = None     # the loader benchmark's batch (None: batch_size). Its epoch must
                                        # hold many batches per worker, or the timed part is one round.
    step_batches: tuple[int, ...] = ()  # the student-step sweep's batch sizes (empty: batch_size alone)
    compile_batches: tuple[int, ...] = ()   # batch sizes also timed with run.compile (torch.compile)
    stage_images: int = 64              # 512 px images whose loader stages are timed per sample
    loader_cores: int = 1               # DataLoader workers the loader's capacity is counted for
    end_to_end_rounds: int = 2          # epochs of each whole pipeline in the end-to-end benchmark

    @property
    def loader_batch_size(self) -> int:
        return self.loader_batch or self.batch_size

    def to_dict(self) -> dict:
        return asdict(self)


TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}

# CPU: the shapes of the real problem scaled down (originals twice the stored size, as NIH's
# 1024 -> 512), with small models. The quick run works at a quarter of the linear size (256 -> 128)
# so that it fits 5 minutes on 2 shared cores, with 1536 training images: an epoch of 48 batches,
# since one of 384 timed only 0.1 s of loading and two runs gave 2.65x and 3.28x for one loader
# ratio. Its end-to-end benchmark runs one epoch per side (30 s for two, of a 156 s suite, on
# 2 busy cores). The full run works at half the linear size (512 -> 256), where the
# disease teacher takes 128 px rather than the stored size to keep its precompute in minutes.
CPU_QUICK = Profile(
    name="cpu-quick", original_size=256, stored_size=128, distinct_images=24, build_images=600,
    build_workers=(1, 2), train_images=1536, shard_size=128, n_views=2, batch_size=32,
    student=ModelSpec("resnet18", 64, TINY_RESNET),
    disease=ModelSpec("test_efficientnet", None), anatomy=ModelSpec("test_convnext", 64),
    loader_workers=(0, 1, 2), pipeline_workers=1, warmup_steps=2, timed_steps=6, precompute_batch=64,
    scale_items=(1_000, 100_000, 1_000_000), row_reads=100, step_batches=(16, 32, 64), stage_images=64,
    end_to_end_rounds=1,
)

CPU_FULL = Profile(
    name="cpu-full", original_size=512, stored_size=256, distinct_images=64, build_images=10_000,
    build_workers=(1, 2), train_images=1024, shard_size=128, n_views=2, batch_size=32,
    student=CPU_QUICK.student, disease=ModelSpec("test_efficientnet", 128), anatomy=CPU_QUICK.anatomy,
    loader_workers=(0, 1, 2), pipeline_workers=1, warmup_steps=3, timed_steps=20, precompute_batch=64,
    scale_items=(1_000, 100_000, 1_000_000), row_reads=300, step_batches=(16, 32, 64), stage_images=128,
)

# CUDA: the paper's sizes, sized for one call of benchmarks/gpu.sh (at most 8 minutes with the
# install). The first H200 runs already swept 2-16 loader workers and pinned memory; these keep the
# workers the issue allows (up to 12 of 16 cores). One batch size is compiled: Swin-B's compile
# takes about a minute (a guess: never measured on the GPU), and each further batch size would
# compile again. The disease teacher renders at the stored size (512), as our cxr-foundation
# adapter feeds CXR-FM (no client-side resize). timm's EfficientNet-L2 pools 5504-d features (its
# head conv) where CXR-FM returns 1376-d; only the cached target width differs.
CUDA = Profile(
    name="cuda", original_size=1024, stored_size=512, distinct_images=64, build_images=1000,
    build_workers=(1, 4, 16), train_images=1024, shard_size=64, n_views=2, batch_size=64,
    student=ModelSpec("swin_base_patch4_window7_224", 224),
    disease=ModelSpec("tf_efficientnet_l2", None), anatomy=ModelSpec("resnet50", 224),
    loader_workers=(4, 8, 12), pipeline_workers=8, warmup_steps=3, timed_steps=10, precompute_batch=64,
    scale_items=(1_000, 100_000, 1_000_000), row_reads=300, loader_batch=16,
    overhead_sweep=((4, True), (12, True)),
    step_batches=(64, 128, 256), compile_batches=(128,), stage_images=256, loader_cores=12,
)


# The CUDA profile's models and shapes at the smallest counts, on any device: a check of the CUDA
# suite's code path (models build, shapes join, every benchmark ends) before a lent GPU's minutes
# are spent on it. Its ratios mean nothing.
CUDA_SMOKE = Profile(
    name="cuda-smoke", original_size=1024, stored_size=512, distinct_images=2, build_images=8,
    build_workers=(1, 2), train_images=8, shard_size=4, n_views=2, batch_size=2,
    student=CUDA.student, disease=CUDA.disease, anatomy=CUDA.anatomy,
    loader_workers=(0, 2), pipeline_workers=2, warmup_steps=1, timed_steps=1, precompute_batch=2,
    scale_items=(1_000, 10_000), row_reads=10,
    step_batches=(2, 4), compile_batches=(2,), stage_images=4, loader_cores=12, end_to_end_rounds=1,
)

PROFILES = {p.name: p for p in (CPU_QUICK, CPU_FULL, CUDA, CUDA_SMOKE)}


def choose_profile(device: str, quick: bool, name: str | None = None) -> Profile:
    """The named profile, or the one for the device (and --quick) when none is named."""
    if name:
        if name not in PROFILES:
            raise LeaderError(f"--profile must be one of {', '.join(PROFILES)}, got {name!r}")
        return PROFILES[name]
    if device == "cpu":
        return CPU_QUICK if quick else CPU_FULL
    if device == "cuda":
        return CUDA          # already sized for gpu.sh's 8 minutes; --quick changes nothing
    raise LeaderError(f"--device must be cpu or cuda, got {device!r}")
