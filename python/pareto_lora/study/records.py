"""One finished run as a record: what ``run(method, seed)`` returned, checked, and its JSON form.

The decision (docs/your_data.md): a returned value that cannot be a result -- not a dict, a missing
or undeclared metric, a value that is not a real number -- is a bug in the caller's code, so it
raises ``ValueError`` at once (nothing is logged for that run; the runs before it stay in the log).
A non-finite number (NaN, +-inf: a diverged training) is an outcome: the run is recorded as
*failed* and left out of its method's paired comparisons at that seed, and the report names it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from .. import args
from .protocol import Method, Protocol

__all__ = ["Record", "outcome", "check_keys", "parse"]


@dataclasses.dataclass(frozen=True)
class Record:
    method: Method
    seed: int
    metrics: dict  # metric -> float (NaN / +-inf in a failed run)

    @property
    def failure(self) -> str | None:
        """None for a finished run, else which metrics were not finite (e.g. ``"image = nan"``)."""
        bad = [f"{m} = {v}" for m, v in self.metrics.items() if not math.isfinite(v)]
        return ", ".join(bad) or None

    def as_dict(self) -> dict:
        """The log's line: non-finite values as the strings 'nan', 'inf', '-inf' (strict JSON has none)."""
        return {"method": self.method.name, "rule": self.method.rule, "weight": self.method.weight, "seed": self.seed,
                "status": "failed" if self.failure else "ok",
                "metrics": {m: v if math.isfinite(v) else str(v) for m, v in self.metrics.items()}}


def _metrics(where: str, returned, protocol: Protocol, strings: bool) -> dict:
    """metric -> float, in the protocol's order; ``strings``: 'nan'/'inf'/'-inf' accepted (a log's form)."""
    if not isinstance(returned, dict):
        raise ValueError(f"{where}: expected a dict of metrics {{'text': ..., 'image': ...}}, got {args.shown(returned)}")
    missing = [m for m in protocol.metrics if m not in returned]
    extra = [m for m in returned if m not in protocol.metrics]
    if missing:
        raise ValueError(f"{where}: expected the metrics {', '.join(protocol.metrics)}; missing {', '.join(map(repr, missing))}")
    if extra:
        raise ValueError(f"{where}: expected only the metrics {', '.join(protocol.metrics)} (declare extra ones in "
                         f"higher_is_better= or lower_is_better=); got {', '.join(map(repr, extra))}")
    out = {}
    for m in protocol.metrics:
        v = returned[m]
        if strings and v in ("nan", "inf", "-inf"):
            v = float(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{where}: expected a number for metric {m!r}, got {args.shown(v)}")
        try:
            out[m] = float(v)
        except OverflowError:  # an int beyond float's range: not finite, as a float
            out[m] = math.inf if v > 0 else -math.inf
    return out


def outcome(protocol: Protocol, method: Method, seed: int, returned) -> Record:
    """The record of ``run(method, seed)`` having returned ``returned`` (raises for a bug, see above)."""
    return Record(method, seed, _metrics(f"run({method.name!r}, seed={seed})", returned, protocol, strings=False))


def check_keys(where: str, d) -> None:
    """ValueError unless ``d`` is a dict with rule, seed, metrics, and weight when rule is None."""
    if not isinstance(d, dict) or not {"rule", "seed", "metrics"} <= set(d) or (d["rule"] is None and "weight" not in d):
        raise ValueError(f"{where}: expected a dict with the keys rule, seed, metrics (and weight when rule is None), "
                         f"got {args.shown(d)}")


def parse(where: str, d, protocol: Protocol) -> Record:
    """A record from its dict form ({"rule", "weight", "seed", "metrics"}; "weight" may be left out of
    a rule's run; "method" and "status", if present, are the log's own and recomputed). ``where``
    names it in errors (e.g. ``records[3]``)."""
    check_keys(where, d)
    rule, weight, seed = d["rule"], d.get("weight"), d["seed"]
    if rule is None:
        w = args.positive(f"{where}.weight", weight)
        if w not in protocol.weights:
            raise ValueError(f"{where}.weight: expected one of the study's weights {list(protocol.weights)}, got {args.shown(weight)}")
        method = Method(None, w)
    else:
        if rule not in protocol.rules:
            raise ValueError(f"{where}.rule: expected None or one of {', '.join(protocol.rules)}, got {args.shown(rule)}")
        if weight is not None:
            raise ValueError(f"{where}.weight: expected None for a rule's run, got {args.shown(weight)}")
        method = Method(rule, None)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) not in protocol.seeds:
        raise ValueError(f"{where}.seed: expected one of the study's seeds {list(protocol.seeds)}, got {args.shown(seed)}")
    return Record(method, int(seed), _metrics(f"{where}.metrics", d["metrics"], protocol, strings=True))
