"""`leader demo`: the whole system on the phantom, as the pipeline file configs/demo.pipeline.yaml.

    outcome = run_demo("runs/demo", profile="smoke")
    print(outcome.report)

The demo is an ordinary pipeline run by `leader reproduce`'s engine: phantom shards (and a second
phantom set the student also distils from) -> the two demo teachers, trained by `leader demo
teacher` and saved in the real formats -> `leader precompute` of each over both sets -> `leader
train` -> every evaluation of the student, each teacher and their concatenation -> the report with
the paper's claims marked PASS or FAIL. Its profiles are the pipeline file's: `smoke` (tiny) and
`full` (the ablations). Every step resumes as `leader reproduce` does.
"""
from __future__ import annotations

import json
from pathlib import Path

from leader.reproduce.runner import Outcome, Reporter, reproduce

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_PIPELINE = REPO_ROOT / "configs" / "demo.pipeline.yaml"
PROFILES = {"default": None, "smoke": "smoke", "full": "full"}     # `leader demo` flag -> pipeline profile


def run_demo(out: str | Path, profile: str = "default", reporter: Reporter | None = None) -> Outcome:
    """Run (or resume) the demo in `out` with one of PROFILES."""
    return reproduce(DEMO_PIPELINE, out, profile=PROFILES[profile], reporter=reporter)


def step_seconds(out: str | Path) -> dict[str, float]:
    """How long each finished step took, from its marker."""
    state = Path(out) / "state"
    seconds = {}
    for path in sorted(state.glob("*.json")) if state.exists() else []:
        marker = json.loads(path.read_text())
        if marker.get("status") == "done" and "seconds" in marker:
            seconds[marker["step"]] = marker["seconds"]
    return seconds
