"""Claims: declarative statements about evaluation results, each judged PASS or FAIL.

    verdicts = [judge(claim, metrics) for claim in load_claims("claims.yaml")]

A claim names a protocol, a metric (its primary one by default) and a subject representation
(a shell-style pattern that must match one), then one or more tests, all of which must hold:

    - name: the student separates landmarks far better than the disease teacher
      protocol: anatomy
      subject: "run:*/student"
      beats: teacher:disease          # a one-sided paired test: subject > this, p < alpha (0.05)
      gap: {weak: teacher:disease, strong: teacher:anatomy, closes: 0.5}
    - name: retrieval is useful at all
      protocol: retrieval
      subject: "run:*/student"
      value: 0.2                      # subject >= value
    - name: within 0.03 of the disease teacher
      protocol: linear-probe
      subject: "run:*/student"
      reference: teacher:disease      # subject >= times * reference + plus
      plus: -0.03

`gap` measures the subject on the scale the two references define: the fraction of the gap from
`weak` to `strong` that it closes, (subject - weak) / (strong - weak); 1 is as good as `strong`,
0 no better than `weak`. A statement in that form means the same however hard the test, which a
fixed margin does not (a margin of 0.10 cannot be met when the references are 0.05 apart). When
`strong` does not exceed `weak` there is no gap to close, and the claim fails saying so.

`beats` pairs the two representations' repeated measurements that the protocol records for this
(metrics.json `paired`): cross-validation folds over the same patients (a paired t-test),
retrieval queries (a paired t-test), or bootstrap resamples of the same test images (the share of
resamples in which the subject is not ahead). A missing number is a FAIL that says what is missing.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leader.errors import LeaderError

CLAIM_KEYS = {"name", "protocol", "metric", "subject", "reference", "value", "times", "plus", "gap", "beats", "alpha"}
TESTS = ("reference", "value", "gap", "beats")
ALPHA = 0.05


@dataclass
class Verdict:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}: {self.name} ({self.detail})"


def load_claims(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise LeaderError(f"claims file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        claims = yaml.safe_load(text)
    else:
        claims = json.loads(text)
    return check_claims(claims, str(path))


def check_claims(claims, where: str = "claims") -> list[dict]:
    if not isinstance(claims, list):
        raise LeaderError(f"{where}: claims must be a list of mappings")
    for i, claim in enumerate(claims):
        if not isinstance(claim, dict):
            raise LeaderError(f"{where}: claim {i} is not a mapping")
        unknown = set(claim) - CLAIM_KEYS
        if unknown:
            raise LeaderError(f"{where}: claim {i} has unknown keys {sorted(unknown)}; allowed: {sorted(CLAIM_KEYS)}")
        for key in ("name", "protocol", "subject"):
            if key not in claim:
                raise LeaderError(f"{where}: claim {i} lacks {key!r}")
        if not any(t in claim for t in TESTS):
            raise LeaderError(f"{where}: claim {claim['name']!r} tests nothing; give one or more of {', '.join(TESTS)}")
        if "reference" in claim and "value" in claim:
            raise LeaderError(f"{where}: claim {claim['name']!r} gives both 'reference' and 'value'; give one")
        gap = claim.get("gap")
        if gap is not None and (not isinstance(gap, dict) or set(gap) != {"weak", "strong", "closes"}):
            raise LeaderError(f"{where}: claim {claim['name']!r}: gap must be {{weak: REPR, strong: REPR, closes: FRACTION}}")
    return claims


def find(metrics: list[dict], protocol: str, pattern: str) -> tuple[dict | None, str]:
    """The one metrics entry of `protocol` whose representation matches `pattern`, or why none."""
    matches = [m for m in metrics if m["protocol"] == protocol and fnmatch.fnmatchcase(m["representation"], pattern)]
    if len(matches) > 1:
        names = ", ".join(m["representation"] for m in matches)
        raise LeaderError(f"claims: {pattern!r} matches several {protocol} representations ({names}); make it specific")
    if not matches:
        return None, f"no {protocol} metrics for {pattern}"
    return matches[0], ""


class _Missing(Exception):
    """A number a claim needs is not in the results."""


def judge(claim: dict, metrics: list[dict]) -> Verdict:
    try:
        subject = _entry(metrics, claim, claim["subject"])
        metric = claim.get("metric", subject["primary"])
        value = _value(subject, metric)
        results = [test(claim, metrics, subject, metric, value)
                   for key, test in (("reference", _against_reference), ("value", _against_value),
                                     ("gap", _gap_closed), ("beats", _paired)) if key in claim]
    except _Missing as e:
        return Verdict(claim["name"], False, f"missing: {e}")
    detail = "; ".join(text for _, text in results)
    return Verdict(claim["name"], all(ok for ok, _ in results), f"{metric}: {detail}")


def _entry(metrics: list[dict], claim: dict, pattern: str) -> dict:
    entry, missing = find(metrics, claim["protocol"], pattern)
    if entry is None:
        raise _Missing(missing)
    return entry


def _value(entry: dict, metric: str) -> float:
    if metric not in entry:
        raise _Missing(f"{entry['representation']} has no {metric}")
    return float(entry[metric])


def _against_value(claim: dict, metrics, subject: dict, metric: str, value: float) -> tuple[bool, str]:
    threshold = float(claim["value"])
    ok = value >= threshold
    return ok, f"{subject['representation']} {value:.4f} {'>=' if ok else '<'} {threshold:.4f}"


def _against_reference(claim: dict, metrics, subject: dict, metric: str, value: float) -> tuple[bool, str]:
    reference = _entry(metrics, claim, claim["reference"])
    ref_value = _value(reference, metric)
    times, plus = float(claim.get("times", 1.0)), float(claim.get("plus", 0.0))
    threshold = times * ref_value + plus
    against = (f"{times:g} x " if times != 1.0 else "") + f"{reference['representation']} {ref_value:.4f}" \
        + (f" {plus:+g}" if plus else "")
    ok = value >= threshold
    return ok, f"{subject['representation']} {value:.4f} {'>=' if ok else '<'} {against} = {threshold:.4f}"


def gap_closed(value: float, weak: float, strong: float) -> float | None:
    """The fraction of the gap from weak to strong that value closes; None when there is no gap."""
    return (value - weak) / (strong - weak) if strong > weak else None


def _gap_closed(claim: dict, metrics, subject: dict, metric: str, value: float) -> tuple[bool, str]:
    gap = claim["gap"]
    weak, strong = (_entry(metrics, claim, gap[k]) for k in ("weak", "strong"))
    low, high, needed = _value(weak, metric), _value(strong, metric), float(gap["closes"])
    closed = gap_closed(value, low, high)
    if closed is None:
        return False, (f"no gap to close: {strong['representation']} {high:.4f} does not exceed "
                       f"{weak['representation']} {low:.4f}")
    ok = closed >= needed
    return ok, (f"{subject['representation']} {value:.4f} closes {closed:.0%} of the gap from {weak['representation']} "
                f"{low:.4f} to {strong['representation']} {high:.4f} ({'>=' if ok else '<'} {needed:.0%})")


def paired_test(a: np.ndarray, b: np.ndarray, test: str) -> float:
    """One-sided p-value of "a > b" over paired measurements. t: a paired t-test (folds, queries);
    bootstrap: the share of resamples in which a is not ahead, (1 + #{a_i <= b_i}) / (1 + n)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size < 2:
        raise _Missing(f"paired samples of different lengths or fewer than 2 ({a.size} and {b.size})")
    diff = a - b
    if test == "bootstrap":
        return float((1 + np.sum(diff <= 0)) / (1 + diff.size))
    if test != "t":
        raise LeaderError(f"claims: unknown paired test {test!r}")
    if np.all(diff == diff[0]):                      # no spread: the sign decides
        return 0.0 if diff[0] > 0 else 1.0
    from scipy.stats import ttest_rel

    return float(ttest_rel(a, b, alternative="greater").pvalue)


def _paired(claim: dict, metrics, subject: dict, metric: str, value: float) -> tuple[bool, str]:
    other = _entry(metrics, claim, claim["beats"])
    alpha = float(claim.get("alpha", ALPHA))
    paired = subject.get("paired")
    if not paired or paired.get("metric", subject["primary"]) != metric:
        raise _Missing(f"{subject['representation']} records no paired samples of {metric}")
    if other.get("paired") != paired:
        raise _Missing(f"{other['representation']} records its {metric} samples differently")
    a, b = subject.get(paired["field"]), other.get(paired["field"])
    if a is None or b is None:
        raise _Missing(f"{paired['field']} of {subject['representation'] if a is None else other['representation']}")
    p = paired_test(np.asarray(a), np.asarray(b), paired["test"])
    ahead = float(np.mean(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))
    ok = p < alpha
    return ok, (f"ahead of {other['representation']} by {ahead:+.4f} over {len(a)} paired {paired['over']}, "
                f"one-sided p = {p:.3g} ({'<' if ok else '>='} {alpha:g})")
