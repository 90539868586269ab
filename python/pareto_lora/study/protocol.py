"""A study's protocol: its methods (the reweighting curve and the rules), seeds and metrics, validated once.

Pure Python (no torch): :class:`Protocol` is built by :class:`~pareto_lora.study.Study` from the
user's arguments and by :class:`~pareto_lora.study.Result` from a log's first line or from records
collected elsewhere; every bad value raises ``ValueError("<argument>: expected ...")`` naming it.
"""

from __future__ import annotations

import dataclasses
import numbers

from .. import args

__all__ = ["REQUIRED", "Method", "Protocol"]

#: the metrics every run returns; lower is better for both (held-out losses, excess losses, ...)
REQUIRED = ("text", "image")


@dataclasses.dataclass(frozen=True)
class Method:
    """One method of a study, as ``run(method, seed)`` receives it.

    ``rule``: a rule name (e.g. ``"pareto_lora"``, ``"upgrad"``, ``"mimo"``), or None for a point
    of the reweighting curve. ``weight``: when ``rule`` is None, the ``w`` of ``L_text +
    w*L_image`` to train with (``w = 1`` is vanilla LoRA, the baseline); None for a rule.
    """

    rule: str | None
    weight: float | None

    @property
    def name(self) -> str:
        """``"w=<w>"`` for a curve point, else the rule's name (how logs and reports name it)."""
        return f"w={self.weight:g}" if self.rule is None else self.rule

    @property
    def is_vanilla(self) -> bool:
        return self.rule is None and self.weight == 1.0


def _names(name: str, value, allowed=None) -> tuple[str, ...]:
    """A list of distinct non-empty strings (a lone string is refused: it would iterate its letters)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name}: expected a list of names, got {args.shown(value)}")
    out = tuple(value)
    for i, v in enumerate(out):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name}[{i}]: expected a non-empty string, got {args.shown(v)}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"{name}[{i}]: expected one of {', '.join(allowed)}, got {v!r}")
        if v.startswith("w="):  # reserved for the curve's points ("w=2")
            raise ValueError(f"{name}[{i}]: expected a name that does not start with 'w=', got {v!r}")
    dup = sorted({v for v in out if out.count(v) > 1})
    if dup:
        raise ValueError(f"{name}: expected distinct names, got {', '.join(map(repr, dup))} more than once")
    return out


def _weights(value) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"weights: expected a list of positive numbers including 1, got {args.shown(value)}")
    ws = [args.positive(f"weights[{i}]", w) for i, w in enumerate(value)]
    if len({f"{w:g}" for w in ws}) != len(ws):  # the curve's points are named "w=<w:g>" (logs, reports)
        raise ValueError(f"weights: expected distinct weights (to 6 significant digits), got {args.shown(list(value))}")
    if 1.0 not in ws:
        raise ValueError(f"weights: expected the weight 1 (vanilla LoRA, the baseline) among them, got {args.shown(list(value))}")
    return tuple(sorted(ws))


def _seeds(value) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"seeds: expected a list of distinct integers, got {args.shown(value)}")
    out = []
    for i, s in enumerate(value):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"seeds[{i}]: expected an integer, got {args.shown(s)}")
        out.append(int(s))
    if not out:
        raise ValueError("seeds: expected one or more seeds, got none")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: expected distinct seeds, got {args.shown(out)}")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a study runs and how it compares. Build it with :meth:`build` (validates)."""

    rules: tuple[str, ...]
    weights: tuple[float, ...]  # ascending, 1.0 among them
    seeds: tuple[int, ...]  # ascending
    higher_is_better: tuple[str, ...] = ()  # extra metrics, compared with vanilla only
    lower_is_better: tuple[str, ...] = ()

    @classmethod
    def build(cls, rules, weights, seeds, higher_is_better=(), lower_is_better=(), known_rules=None) -> Protocol:
        """Validated protocol; ``known_rules``: the names ``rules`` may take (None: any name)."""
        rules = _names("rules", rules, known_rules)
        if not rules:
            raise ValueError("rules: expected one or more rule names, got none")
        hi, lo = _names("higher_is_better", higher_is_better), _names("lower_is_better", lower_is_better)
        for name, metrics in (("higher_is_better", hi), ("lower_is_better", lo)):
            fixed = [m for m in metrics if m in REQUIRED]
            if fixed:
                raise ValueError(f"{name}: expected extra metrics only ('text' and 'image' are always lower-is-better), "
                                 f"got {', '.join(map(repr, fixed))}")
        both = sorted(set(hi) & set(lo))
        if both:
            raise ValueError(f"higher_is_better: expected metrics not also in lower_is_better, got {', '.join(map(repr, both))}")
        return cls(rules, _weights(weights), _seeds(seeds), tuple(sorted(hi)), tuple(sorted(lo)))

    @property
    def methods(self) -> tuple[Method, ...]:
        """The curve's points (ascending w) and then the rules, in the order each seed runs them."""
        return (*(Method(None, w) for w in self.weights), *(Method(r, None) for r in self.rules))

    @property
    def metrics(self) -> tuple[str, ...]:
        return (*REQUIRED, *self.lower_is_better, *self.higher_is_better)

    def lower_is_better_for(self, metric: str) -> bool:
        return metric not in self.higher_is_better

    def as_dict(self) -> dict:
        return {"rules": list(self.rules), "weights": list(self.weights), "seeds": list(self.seeds),
                "higher_is_better": list(self.higher_is_better), "lower_is_better": list(self.lower_is_better)}

    @classmethod
    def from_dict(cls, d) -> Protocol:
        if not isinstance(d, dict) or set(d) != set(cls.__dataclass_fields__):
            raise ValueError(f"protocol: expected the keys {', '.join(cls.__dataclass_fields__)}, got {args.shown(d)}")
        return cls.build(d["rules"], d["weights"], d["seeds"], d["higher_is_better"], d["lower_is_better"])

    def differences(self, other: Protocol) -> list[str]:
        """'field: <self's> vs <other's>' for each field that differs (the order of rules does not count)."""
        mine, theirs = self.as_dict(), other.as_dict()
        mine["rules"], theirs["rules"] = sorted(mine["rules"]), sorted(theirs["rules"])
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
