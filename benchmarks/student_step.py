"""The student's training step alone: images/s by batch size, eager against `run.compile`, and MFU.

Each configuration is `leader train`'s own Trainer (one optimizer step: view replay, forward,
loss, backward, clipping, fused AdamW on CUDA) on batches already on the device. Its first call
(where torch.compile compiles) and `warmup_steps` more are not timed; then every configuration
takes one step per round, so drift during the run is shared (harness.interleaved_step_times).

MFU is the model's FLOPs per step, counted by torch's FlopCounterMode on one real step (matrix
products and convolutions, forward and backward), over the card's dense bf16 peak from the table
below; the measured rate of a large bf16 matrix product on the same card is given beside it, as
the ceiling a step could reach in practice. Devices not in the table get no MFU. When the
loader_stages benchmark ran first, one more figure sets `loader_cores` workers' samples/s at
512 px against the fastest configuration's images/s.
"""
from __future__ import annotations

import itertools
import re
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import Context, Figure, interleaved_step_times, median, synchronize
from benchmarks.step_rate import device_batches

# Dense (not sparse) bf16 tensor-core peaks from the vendors' datasheets, in TFLOP/s, matched in
# order against torch.cuda.get_device_name (so "H200 NVL" before "H200", "A100" before "A10").
DENSE_BF16_TFLOPS = (
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),                     # SXM
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),                     # SXM ("NVIDIA H100 80GB HBM3")
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)


def dense_bf16_peak(device_name: str) -> float | None:
    """TFLOP/s of the card's dense bf16 peak, or None for a card the table does not know."""
    for pattern, tflops in DENSE_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return None


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """The measured rate of an n x n x n bf16 matrix product on random data (cuBLAS's best case)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = median(interleaved_step_times({"mm": lambda: a @ b}, device, 3, repeats)["mm"])
    return 2 * n ** 3 / seconds / 1e12


def flops_per_step(step, batch: dict) -> int:
    """FLOPs of one real optimizer step, as FlopCounterMode counts them (it changes the weights,
    so count on a step that is not timed)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops()


def config_name(batch_size: int, compiled: bool) -> str:
    return f"{'compiled' if compiled else 'eager'} batch {batch_size}"


def run(ctx: Context) -> list[Figure]:
    p, work, cuda = ctx.profile, ctx.workload, ctx.device.type == "cuda"
    sizes = tuple(dict.fromkeys((*(p.step_batches or (p.batch_size,)), *p.compile_batches)))
    configs = [(b, False) for b in sizes] + [(b, True) for b in p.compile_batches]
    steps, first_call = {}, {}
    flops_per_image = None
    for batch_size, compiled in configs:
        name = config_name(batch_size, compiled)
        trainer = work.trainer(batch_size=batch_size, compile=compiled)
        batches = device_batches(ctx, 2, batch_size)
        if flops_per_image is None and not compiled:
            flops_per_image = flops_per_step(trainer.train_step, batches[0]) / batch_size
        steps[name] = (lambda t=trainer, c=itertools.cycle(batches): t.train_step(next(c)))
        start = time.perf_counter()
        steps[name]()                                   # torch.compile compiles here: never timed
        synchronize(ctx.device)
        first_call[name] = time.perf_counter() - start
        ctx.log(f"student_step: {name}: first step {first_call[name]:.1f}s")
    seconds = {name: median(t) for name, t in
               interleaved_step_times(steps, ctx.device, p.warmup_steps, p.timed_steps).items()}
    rate = {(b, c): b / seconds[config_name(b, c)] for b, c in configs}
    tflops = {config: r * flops_per_image / 1e12 for config, r in rate.items()}
    gpu = torch.cuda.get_device_name(ctx.device) if cuda else None
    peak = dense_bf16_peak(gpu) if gpu else None
    ceiling = matmul_tflops(ctx.device) if cuda else None
    detail = {"student": p.student.arch, "student_px": p.student.input_size, "device": gpu or "cpu",
              "flop_per_image": round(flops_per_image), "gflop_per_image": round(flops_per_image / 1e9, 3),
              "dense_bf16_peak_tflops": peak,
              "measured_bf16_matmul_tflops": round(ceiling, 1) if ceiling else None}
    for (b, c), r in rate.items():
        key = config_name(b, c).replace(" ", "_")
        detail.update({f"{key}_images_per_s": round(r, 1), f"{key}_tflops": round(tflops[(b, c)], 3),
                       f"{key}_first_step_s": round(first_call[config_name(b, c)], 2)})
        ctx.log(f"student_step: {config_name(b, c)}: {r:.1f} images/s, {tflops[(b, c)]:.2f} TFLOP/s"
                + (f", MFU {tflops[(b, c)] / peak:.1%}" if peak else ""))
    best = max(rate, key=rate.get)
    ctx.shared["student_step"] = {"images_per_s": rate[best], "batch": best[0], "compiled": best[1]}

    figures = [Figure("student_step", f"images/s, eager batch {b} / batch {sizes[0]}",
                      rate[(b, False)] / rate[(sizes[0], False)], detail,
                      note=f"{rate[(b, False)]:.0f} vs {rate[(sizes[0], False)]:.0f} images/s")
               for b in sizes[1:]]
    figures += [Figure("student_step", f"images/s, compiled / eager, batch {b}", rate[(b, True)] / rate[(b, False)],
                       detail, note=f"{rate[(b, True)]:.0f} vs {rate[(b, False)]:.0f} images/s; the first "
                                    f"compiled step took {first_call[config_name(b, True)]:.0f}s")
                for b in p.compile_batches]
    loader = ctx.shared.get("loader_stages")
    if loader:
        capacity = p.loader_cores * loader["worker_samples_per_s"]
        figures.append(Figure("student_step", f"{p.loader_cores} loader workers' samples/s (512 px) / the fastest step's "
                              "images/s", capacity / rate[best], {**detail, "loader_cores": p.loader_cores,
                                                                  "loader_samples_per_s": round(capacity, 1)},
                              note=f"{capacity:.0f} vs {rate[best]:.0f} ({config_name(*best)}); the issue's target: "
                                   ">= 1.5 with 12 cores of an H200 machine"))
    if peak:
        figures += [Figure("student_step", f"MFU, {config_name(b, c)}", tflops[(b, c)] / peak, detail,
                           note=f"{r:.0f} images/s, {tflops[(b, c)]:.0f} of {peak:.0f} TFLOP/s dense bf16 ({gpu}); "
                                f"a bf16 matrix product ran at {ceiling:.0f}")
                    for (b, c), r in rate.items()]
    return figures
