"""The protocol registry: the one list that the CLI, the demo and the report iterate."""

import typer

from leader.evaluate.commands import eval_app
from leader.evaluate.protocols import FEATURES, PROTOCOLS, WEIGHTS, Protocol, protocols, register_protocol
from leader.evaluate.report import render_report


def test_every_protocol_has_its_eval_command():
    commands = {c.name for c in typer.main.get_command(eval_app).commands.values()}
    assert {p.command for p in protocols()} <= commands
    assert [p.name for p in protocols(FEATURES)] == ["linear-probe", "linear-probe-lesion", "retrieval", "anatomy"]
    assert "finetune" in [p.name for p in protocols(WEIGHTS)]


def test_a_new_protocol_reaches_the_report_with_its_columns(tmp_path):
    register_protocol(Protocol("toy-count", "toy-count", "json:dumps", "a toy", secondary=("extra",)))
    try:
        metrics = [{"protocol": "toy-count", "representation": r, "primary": "score", "score": s, "extra": e,
                    "samples": {"field": "per_seed", "over": "seeds"}, "per_seed": [s], "_path": str(tmp_path / r / "m.json")}
                   for r, s, e in (("teacher:a", 0.9, 1.0), ("teacher:b", 0.5, 2.0))]
        metrics.append({"protocol": "anatomy", "representation": "teacher:a", "primary": "knn_accuracy",
                        "knn_accuracy": 0.8, "samples": {"field": "per_fold", "over": "folds"}, "per_fold": [0.8],
                        "_path": str(tmp_path / "anatomy.json")})
        text, _ = render_report(metrics, tmp_path)
    finally:
        PROTOCOLS._entries.pop("toy-count")
    summary = next(line for line in text.splitlines() if line.startswith("| representation"))
    # registered after every built-in protocol, so its column comes last
    assert summary.index("anatomy") < summary.index("toy-count")
    assert "| representation | score | extra | vs best |" in text
