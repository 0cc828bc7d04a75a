"""Statistics shared by the benchmarks: ratios of configurations, bootstrap intervals, verdicts.

A benchmark times every configuration once per round, so each ratio has one value per
round. Its figure is the median of those values, and its 95% interval comes from a
bootstrap over rounds (resampling the per-round values with replacement; the interval is
the 2.5th and 97.5th percentiles of the resampled medians). A target *holds* when that
median meets it; the verdict also says whether the whole interval meets it or straddles it.

A ratio of differences such as ``(c1-a)/(c8-a)`` means nothing when its denominator is
indistinguishable from zero (its own interval contains zero): the verdict is then
"undetermined". When the ratio's interval contains zero, it is reported as crossing zero
instead of as a three-decimal figure.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    """A median and its bootstrap interval."""

    median: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_median(values: Sequence[float], resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Interval:
    """The median of ``values`` and the percentile bootstrap interval of that median."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)  # seeded: the same JSON always prints the same interval
    medians = np.median(data[rng.integers(0, len(data), size=(resamples, len(data)))], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(medians, [tail, 100 - tail])
    return Interval(float(np.median(data)), float(low), float(high))


_TERM = re.compile(r"^\(?([\w]+)(?:-([\w]+))?\)?$")


@dataclass(frozen=True)
class Ratio:
    """``(x - y) / (u - v)`` over configurations' times, parsed from a name such as
    ``"b/a"`` or ``"(c1-a)/(c8-a)"``; a side without ``-`` is a single time."""

    name: str

    def _sides(self) -> tuple[tuple[str, str | None], tuple[str, str | None]]:
        num, den = self.name.split("/")
        return _term(num), _term(den)

    @property
    def configs(self) -> frozenset[str]:
        """The configurations whose times it reads."""
        return frozenset(c for side in self._sides() for c in side if c is not None)

    @property
    def of_differences(self) -> bool:
        return any(side[1] is not None for side in self._sides())

    def denominator(self, times: Mapping[str, float]) -> float:
        return _value(self._sides()[1], times)

    def __call__(self, times: Mapping[str, float]) -> float:
        """Its value for one round's ``times`` (ms per configuration)."""
        num, den = self._sides()
        return _value(num, times) / _value(den, times)


def _term(text: str) -> tuple[str, str | None]:
    match = _TERM.match(text.strip())
    if match is None:
        raise ValueError(f"ratio side {text!r} is neither a configuration nor (x-y) of two; write e.g. 'b/a' or '(c1-a)/(c8-a)'.")
    return match.group(1), match.group(2)


def _value(term: tuple[str, str | None], times: Mapping[str, float]) -> float:
    return times[term[0]] - (times[term[1]] if term[1] is not None else 0.0)


@dataclass(frozen=True)
class Target:
    """A bound that a ratio should meet: ``op`` is ``"<="`` or ``">="``."""

    op: str
    bound: float

    def met_by(self, value: float) -> bool:
        return value <= self.bound if self.op == "<=" else value >= self.bound

    def __str__(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'} {self.bound:g}"


@dataclass(frozen=True)
class Assessment:
    """One ratio in one phase: its per-round median and interval, and the verdict on its target.

    ``verdict`` is "holds", "falls short", "undetermined" (a ratio of differences whose
    denominator's interval contains zero) or "" when there is no target. ``note`` says
    whether the interval straddles the bound, or what crosses zero.
    """

    ratio: str
    phase: str
    median: float
    low: float
    high: float
    target: str
    verdict: str
    note: str
    crosses_zero: bool  # a ratio of differences whose interval, or its denominator's, contains 0

    def figure(self) -> str:
        """The value as printed: three decimals, or a coarse interval when it crosses zero."""
        if self.crosses_zero:
            return f"crosses 0 [{self.low:.2f}, {self.high:.2f}]"
        return f"{self.median:.3f} [{self.low:.3f}, {self.high:.3f}]"


def assess(ratio: Ratio, phase: str, rounds: Sequence[Mapping[str, float]], target: Target | None) -> Assessment:
    """Judge ``ratio`` over ``rounds`` (one mapping of ms per configuration per round)."""
    ci = bootstrap_median([ratio(times) for times in rounds])
    if any(math.isinf(x) for x in (ci.low, ci.high)):
        raise ValueError(f"{ratio.name} ({phase}): a round's denominator was exactly zero.")
    notes = []
    undetermined = False
    if ratio.of_differences:
        denominator = bootstrap_median([ratio.denominator(times) for times in rounds])
        undetermined = denominator.contains(0.0)
        if undetermined:
            notes.append(f"denominator crosses 0 [{denominator.low:.3g}, {denominator.high:.3g}] ms")
        elif ci.contains(0.0):
            notes.append("crosses 0")
    verdict = "" if target is None else "undetermined" if undetermined else _verdict(ci, target, notes)
    crosses = ratio.of_differences and (undetermined or ci.contains(0.0))
    return Assessment(ratio.name, phase, ci.median, ci.low, ci.high, str(target or ""), verdict, "; ".join(notes), crosses)


def _verdict(ci: Interval, target: Target, notes: list[str]) -> str:
    """"holds" or "falls short" by the median; appends where the interval lies to ``notes``."""
    if target.met_by(ci.low) != target.met_by(ci.high):
        notes.append("CI straddles the bound")
    else:
        notes.append("whole CI " + ("meets it" if target.met_by(ci.low) else "misses it"))
    return "holds" if target.met_by(ci.median) else "falls short"
