"""What every benchmark shares: the run context, ratio figures, timing and machine facts.

A benchmark is a function `run(ctx) -> list[Figure]`. A Figure is one ratio plus the measured rates
behind it, so the JSON keeps the raw numbers and the table shows what was compared.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from benchmarks.profiles import Profile
from leader.errors import LeaderError


@dataclass
class Figure:
    benchmark: str
    name: str            # what the ratio compares, e.g. "ours / official loader, 2 workers"
    ratio: float
    detail: dict         # the measured rates behind the ratio (units in the key names)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    profile: Profile
    device: torch.device
    workdir: Path
    log: Callable[[str], None] = print
    shared: dict = field(default_factory=dict)     # results one benchmark leaves for another

    @property
    def workload(self):
        if "workload" not in self.shared:
            from benchmarks.workload import Workload

            self.shared["workload"] = Workload(self.workdir / "workload", self.profile, self.device, self.log)
        return self.shared["workload"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_times(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn`, each call timed alone after `warmup` untimed calls.

    The device is synchronised around every call, so a CUDA call's time is its kernels' time.
    """
    return interleaved_step_times({"fn": fn}, device, warmup, repeats)["fn"]


def interleaved_step_times(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                           repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in rounds (one call of each per round).

    Timing one configuration after another lets whatever drifts during a run (a GPU's clocks rising
    from idle, autotuning, the allocator growing) favour the later ones; in rounds, every
    configuration sees the same drift. On a lent H200, timed one after another, the first of three
    configurations came out 20% slower than the second, which did more work.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def proc_status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LeaderError(f"/proc/self/status has no {field} line (host memory is measured on Linux only)")


def peak_rss_mb() -> float:
    """This process's peak resident set size since it started its program.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child started by a big
    parent reports the parent's size as its own peak. VmHWM belongs to the process's own memory map,
    which exec replaces.
    """
    return proc_status_mb("VmHWM")


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def git_commit(repo: Path) -> str:
    """HEAD, marked when the tree has changes; LEADER_BENCH_COMMIT names it where there is no .git
    (a copy of the tree on a lent GPU machine)."""
    if os.environ.get("LEADER_BENCH_COMMIT"):
        return os.environ["LEADER_BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device, repo: Path) -> dict:
    """Where and when the numbers were taken; the load average says whether the machine was shared."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(repo),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def batch_on_device(batch: dict, device: torch.device) -> dict:
    """The loader's batch with its pixels and targets moved to the device.

    Sizes and view parameters stay on the host, where the step reads them (view geometry is
    planned on the host; reading them back from a GPU would wait for it).
    """
    moved = dict(batch)
    moved["image"] = batch["image"].to(device, non_blocking=True)
    for group in ("targets", "valid", "patch_targets", "patch_valid"):
        if group in batch:
            moved[group] = {k: v.to(device, non_blocking=True) for k, v in batch[group].items()}
    return moved
