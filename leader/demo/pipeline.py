"""`leader demo`: the whole system on the phantom, as the pipeline file configs/demo.pipeline.yaml.

    outcome = run_demo("runs/demo", profile="smoke")
    outcome = run_demo("runs/demo-seed1", seed=1)       # the same demo from other random draws
    print(outcome.report)

The demo is an ordinary pipeline run by `leader reproduce`'s engine: phantom shards -> the two
demo teachers, trained by `leader demo teacher` and saved in the real formats -> `leader
precompute` of each -> `leader train` -> every evaluation of the student, each teacher and their concatenation -> the report with
the paper's claims marked PASS or FAIL. Its profiles are the pipeline file's: `smoke` (tiny) and
`full` (the ablations). Every step resumes as `leader reproduce` does.

`seed` replays the whole demo from other random draws: every `seed` of the pipeline file (the
phantoms', the teachers', the cached views', the student's and the evaluations') moves by
SEED_STRIDE x seed, so that seed 0 is the file as written and no two demo seeds share a draw
(a pipeline file with a second phantom at seed 1 would otherwise give demo seed 1 that phantom).
"""
from __future__ import annotations

import json
from pathlib import Path

from leader.errors import LeaderError
from leader.reproduce.runner import Outcome, Reporter, reproduce
from leader.reproduce.spec import Pipeline, parse_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PIPELINE = REPO_ROOT / "configs" / "demo.pipeline.yaml"
PROFILES = {"default": None, "smoke": "smoke", "full": "full"}     # `leader demo` flag -> pipeline profile
SEED_STRIDE = 1000


def demo_pipeline(profile: str = "default", seed: int = 0) -> Pipeline:
    """The demo's pipeline with one of PROFILES, its seeds moved for demo seed `seed`."""
    import yaml

    if seed < 0:
        raise LeaderError(f"--seed must be 0 or more, got {seed}")
    raw = yaml.safe_load(DEMO_PIPELINE.read_text(encoding="utf-8"))
    if seed:
        raw = moved_seeds(raw, SEED_STRIDE * seed)
        # Its own name: an output folder holds one pipeline, so one seed's run never overwrites another's.
        raw["name"] = f"{raw['name']}-seed{seed}"
        raw["title"] = f"{raw.get('title', raw['name'])} (seed {seed})"
    return parse_pipeline(raw, DEMO_PIPELINE, PROFILES[profile])


def moved_seeds(raw, offset: int):
    """A copy of the pipeline file's tree with every integer under a `seed` key moved by `offset`."""
    if isinstance(raw, dict):
        return {k: (v + offset if k == "seed" and isinstance(v, int) and not isinstance(v, bool) else moved_seeds(v, offset))
                for k, v in raw.items()}
    if isinstance(raw, list):
        return [moved_seeds(v, offset) for v in raw]
    return raw


def default_out(seed: int) -> Path:
    return Path("runs/demo") if seed == 0 else Path(f"runs/demo-seed{seed}")


def run_demo(out: str | Path, profile: str = "default", reporter: Reporter | None = None, seed: int = 0) -> Outcome:
    """Run (or resume) the demo in `out` with one of PROFILES and demo seed `seed`."""
    return reproduce(demo_pipeline(profile, seed), out, reporter=reporter)


def step_seconds(out: str | Path) -> dict[str, float]:
    """How long each finished step took, from its marker."""
    state = Path(out) / "state"
    seconds = {}
    for path in sorted(state.glob("*.json")) if state.exists() else []:
        marker = json.loads(path.read_text())
        if marker.get("status") == "done" and "seconds" in marker:
            seconds[marker["step"]] = marker["seconds"]
    return seconds
