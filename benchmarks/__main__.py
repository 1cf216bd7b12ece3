"""`python -m benchmarks run [--quick] [--device cpu|cuda] [--out FILE.json]`: every ratio, one table."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("LEADER_PROGRESS", "0")

import importlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from benchmarks.harness import Context, Figure, machine  # noqa: E402
from benchmarks.profiles import choose_profile  # noqa: E402
from benchmarks.workload import require_cuda  # noqa: E402
from leader.errors import LeaderError  # noqa: E402
from leader.io import atomic_write_json  # noqa: E402

# In run order: the cache is built (and its precompute timed) before anything reads it; the
# student step comes last of those a GPU times, as its compile is the one part of unknown length
# (the JSON is rewritten after each benchmark, so a run cut short keeps what ended).
BENCHMARKS = ("shard_build", "precompute_rate", "cache_cost", "loader_stages", "loader", "step_rate", "overhead",
              "end_to_end", "student_step", "scale")
REPO = Path(__file__).resolve().parents[1]

app = typer.Typer(add_completion=False, help="leader's benchmarks: ratios measured side by side in one run.")
console = Console(stderr=True)


def run_suite(ctx: Context, names: tuple[str, ...] = BENCHMARKS,
              after_each: Callable[[list[Figure], dict, dict], None] = lambda *_: None,
              ) -> tuple[list[Figure], dict[str, float], dict[str, str]]:
    """Run the benchmarks in order; one that fails is logged with its traceback and the rest still run.

    A lent GPU's minutes are few, so one broken benchmark must not cost the others' numbers.
    `after_each(figures, seconds, errors)` is called after every benchmark (the JSON is rewritten there).
    """
    figures, seconds, errors = [], {}, {}
    for name in names:
        start = time.perf_counter()
        ctx.log(f"[bold]{name}[/bold]")
        try:
            figures += importlib.import_module(f"benchmarks.{name}").run(ctx)
        except Exception as exc:  # noqa: BLE001 - recorded, reported and turned into the exit status
            errors[name] = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{name} failed[/red]\n{traceback.format_exc()}")
        seconds[name] = round(time.perf_counter() - start, 1)
        after_each(figures, seconds, errors)
    return figures, seconds, errors


def table(figures: list[Figure]) -> Table:
    out = Table(title="leader benchmarks (ratios measured side by side)")
    for column in ("benchmark", "ratio of", "value", "measured"):
        out.add_column(column, justify="right" if column == "value" else "left")
    for f in figures:
        out.add_row(f.benchmark, f.name, f"{f.ratio:.2f}x", f.note)
    return out


@app.callback()
def main() -> None:
    """leader's benchmarks."""


@app.command()
def run(
    quick: bool = typer.Option(False, "--quick", help="the CPU suite sized for 5 minutes on 2 cores"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda: the paper's model sizes)"),
    out: Optional[Path] = typer.Option(None, "--out", help="write every figure and the raw rates to this JSON file"),
    only: list[str] = typer.Option([], "--only", help=f"run only these benchmarks (repeatable): {', '.join(BENCHMARKS)}"),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="keep the generated data here (default: a temporary directory)"),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0: torch's default on cuda, 1 on cpu)"),
    profile_name: Optional[str] = typer.Option(None, "--profile", help="sizes by name instead of by device: "
                                               "cpu-quick, cpu-full, cuda, cuda-smoke (the CUDA models, tiny counts)"),
) -> None:
    # On a CPU with as many busy processes as cores, OpenMP threads that spin-wait for each other
    # make torch up to 40x slower (measured here: view replay 0.2 ms -> 8.4 ms per sample at load
    # 3 on 2 cores); one thread per process keeps the side-by-side ratios about the code.
    if threads or device == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        profile = choose_profile(device, quick, profile_name)
        unknown = sorted(set(only) - set(BENCHMARKS))
        if unknown:
            raise LeaderError(f"--only: unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
        torch_device = torch.device(device)
        require_cuda(torch_device)
    except LeaderError as e:
        console.print(f"error: {e}")
        raise typer.Exit(2) from None
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    started = time.perf_counter()
    facts = machine(torch_device, REPO)
    facts["torch_threads"] = torch.get_num_threads()
    root = workdir or Path(tempfile.mkdtemp(prefix="leader-bench-"))
    ctx = Context(profile, torch_device, root, log=lambda message: console.log(message))
    def write(figures: list[Figure], seconds: dict, errors: dict, complete: bool = False) -> None:
        if out is not None:
            atomic_write_json(out, {"machine": facts, "profile": profile.to_dict(), "seconds": seconds,
                                    "complete": complete, "errors": errors,
                                    "figures": [f.to_dict() for f in figures]})

    try:
        figures, seconds, errors = run_suite(ctx, tuple(b for b in BENCHMARKS if not only or b in only), write)
    finally:
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    facts["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    facts["total_seconds"] = round(time.perf_counter() - started, 1)
    Console().print(table(figures))
    console.print(f"{len(figures)} ratios in {facts['total_seconds']}s on {facts['device']} "
                  f"({facts.get('gpu', facts['cpu'])}, {facts['cpu_count']} CPUs, load {facts['load_average']})")
    write(figures, seconds, errors, complete=True)
    if out is not None:
        console.print(f"wrote {out}")
    if errors:
        console.print(f"error: {len(errors)} benchmark(s) failed: {', '.join(errors)}")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
