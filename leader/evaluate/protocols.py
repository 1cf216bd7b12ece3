"""Evaluation protocols by name: the one list that `leader eval` and `leader report` iterate.

    protocol = PROTOCOLS.get("retrieval")
    metrics = protocol("shards/phantom", ["run:runs/demo/students/student"], "eval/retrieval", k=20)
    for protocol in protocols():        # in report order
        ...

A protocol is named after the `protocol` field of the metrics.json it writes. Each is registered
beside its `leader eval` command in `leader/evaluate/commands.py`, which keeps the command line
fast to start: the code that evaluates (scikit-learn, torch, matplotlib) is imported only when a
protocol runs. Adding a protocol is its module (the function that writes metrics.json) plus its
command and registration there; the report and `eval compare` then know it, and a pipeline file
(`leader reproduce`, `leader demo`) can name it in an evaluation.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from leader.errors import LeaderError
from leader.registry import Registry

FEATURES = "features"        # frozen features of any representation (run:, teacher:, concat:)
WEIGHTS = "weights"          # a backbone's weights, trained further (run:, timm:, exports)


@dataclass(frozen=True)
class Protocol:
    name: str                               # the metrics.json `protocol` it writes
    command: str                            # the `leader eval COMMAND` that runs it
    run: str                                # "module:function"(shards, representation(s), out, **options)
    title: str = ""
    secondary: tuple[str, ...] = ()         # report columns besides the primary metric
    options: Mapping = field(default_factory=dict)    # fixed options (the lesion level of linear-probe)
    inputs: str = FEATURES                  # what it evaluates: FEATURES or WEIGHTS
    representations: str = "one"            # "one" per run, or "many" (an ensemble of several)

    def __call__(self, shards: str | Path, representations: list[str], out: str | Path, **options) -> dict:
        """Run the protocol on a shard set and write OUT/metrics.json; returns the metrics."""
        if self.representations == "one" and len(representations) != 1:
            raise LeaderError(f"{self.name} evaluates one representation at a time, got {representations}")
        module, _, function = self.run.partition(":")
        run = getattr(importlib.import_module(module), function)
        target = representations if self.representations == "many" else representations[0]
        return run(shards, target, out, **{**self.options, **options})


PROTOCOLS: Registry[Protocol] = Registry("evaluation protocol")


def register_protocol(protocol: Protocol) -> Protocol:
    PROTOCOLS.register(protocol.name)(protocol)
    return protocol


def protocols(inputs: str | None = None) -> list[Protocol]:
    """Every registered protocol in report order (the order of registration), optionally by inputs."""
    import leader.evaluate.commands  # noqa: F401  (registers the protocols beside their commands)

    return [p for p in PROTOCOLS.entries() if inputs is None or p.inputs == inputs]


def get_protocol(name: str) -> Protocol:
    import leader.evaluate.commands  # noqa: F401

    return PROTOCOLS.get(name)
