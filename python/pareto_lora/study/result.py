"""A study's result: its protocol and finished runs, the paired comparisons, the report, a JSON form.

Built by :meth:`Study.run <pareto_lora.study.Study.run>`, from a log (:meth:`Result.from_log`) or
from records collected elsewhere (:meth:`Result.from_records`); the same records give the same
result whatever order they came in (the comparisons are computed once, in the protocol's order).
"""

from __future__ import annotations

import math

from .. import args
from . import log
from .compare import finished, power, vs_curve, vs_vanilla
from .protocol import Protocol
from .records import Record, check_keys, parse
from .report import multiplicity, report_lines

__all__ = ["Result"]


class Result:
    """The finished (and failed) runs of a study and what they show.

    ``protocol``: the study's :class:`~pareto_lora.study.protocol.Protocol`; ``records``: one
    :class:`~pareto_lora.study.records.Record` per run that returned, seed by seed in method order;
    ``missing``: the (method, seed) pairs not run (an interrupted study).
    """

    def __init__(self, protocol: Protocol, records):
        by_key = {}
        for r in records:
            if (r.method, r.seed) in by_key:
                raise ValueError(f"records: expected one run per method and seed; {r.method.name} seed {r.seed} twice")
            by_key[(r.method, r.seed)] = r
        order = [(m, s) for s in protocol.seeds for m in protocol.methods]
        self.protocol = protocol
        self.records: tuple[Record, ...] = tuple(by_key[k] for k in order if k in by_key)
        self.missing: tuple = tuple(k for k in order if k not in by_key)
        self._done = finished(self.records)
        self.power: dict = power(protocol, self._done)
        self.comparisons: dict = {rule: {"vs_vanilla": vs_vanilla(protocol, self._done, rule),
                                         "curve_at_equal_text": vs_curve(protocol, self._done, rule, "text"),
                                         "curve_at_equal_image": vs_curve(protocol, self._done, rule, "image")}
                                  for rule in protocol.rules}

    @classmethod
    def from_log(cls, path) -> Result:
        """The result of the study logged at ``path`` (finished or not)."""
        protocol, records = log.read(path)
        return cls(protocol, records)

    @classmethod
    def from_logs(cls, paths) -> Result:
        """One result from the logs of a study split by seed over several jobs (each ran
        ``Study(..., seeds=<its seeds>, log=<its own file>)``; one log per writer, as a log has one).

        The logs must agree on everything but the seeds (the differences are named); the result's seeds
        are the union, and a run logged twice is refused, naming both files.
        """
        if isinstance(paths, (str, bytes, dict)) or not hasattr(paths, "__iter__"):
            raise ValueError(f"paths: expected a list of study log paths, got {args.shown(paths)}")
        paths = list(paths)
        if not paths:
            raise ValueError("paths: expected one or more study log paths, got none")
        read = [(p, *log.read(p)) for p in paths]
        first_path, first, _ = read[0]
        seen: dict = {}
        records = []
        for path, protocol, recs in read:
            diff = [d for d in first.differences(protocol) if not d.startswith("seeds:")]
            if diff:
                raise ValueError(f"paths: expected logs of one protocol (all but the seeds), but {path!r} differs from "
                                 f"{first_path!r}: {'; '.join(diff)}")
            for r in recs:
                key = (r.method, r.seed)
                if key in seen:
                    raise ValueError(f"paths: expected each run in one log; {r.method.name} seed {r.seed} is in "
                                     f"{seen[key]!r} and {path!r}")
                seen[key] = path
                records.append(r)
        seeds = sorted({s for _, protocol, _ in read for s in protocol.seeds})
        merged = Protocol.build(first.rules, first.weights, seeds, first.higher_is_better, first.lower_is_better)
        return cls(merged, records)

    @classmethod
    def from_records(cls, records, *, higher_is_better=(), lower_is_better=()) -> Result:
        """The result of runs collected elsewhere: dicts ``{"rule": name or None, "weight": w (None or
        left out for a rule), "seed": int, "metrics": {"text": ..., "image": ..., extras}}`` (the log's lines).

        The protocol is read off the records (the rules in order of appearance, the weights, the
        seeds); ``higher_is_better`` / ``lower_is_better`` declare the extra metrics, as for
        :class:`~pareto_lora.study.Study`.
        """
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            raise ValueError(f"records: expected a list of run dicts, got {args.shown(records)}")
        records = list(records)
        rules, weights, seeds = [], [], []
        for i, d in enumerate(records):
            check_keys(f"records[{i}]", d)
            if d["rule"] is None:
                weights.append(args.positive(f"records[{i}].weight", d["weight"]))
            elif d["rule"] not in rules:
                rules.append(d["rule"])
            if d["seed"] not in seeds:  # by equality: an unhashable bad seed is named by the protocol
                seeds.append(d["seed"])
        try:
            protocol = Protocol.build(rules, sorted(set(weights)), seeds,
                                      higher_is_better, lower_is_better)
        except ValueError as e:
            text = str(e)
            if not text.startswith(("higher_is_better", "lower_is_better")):
                text = f"records: {text}"  # a protocol read off the records: name where it came from
            raise ValueError(text) from None
        return cls(protocol, [parse(f"records[{i}]", d, protocol) for i, d in enumerate(records)])

    def report(self) -> str:
        """The findings as text: the power line, failures, means, each rule vs vanilla and vs the curve."""
        return "\n".join(report_lines(self.protocol, self.records, self.missing, self._done, self.power, self.comparisons))

    def as_dict(self) -> dict:
        """Everything as JSON-serialisable data (NaN / inf as None in intervals, as strings in metrics)."""
        def curve(c):
            if c is None:
                return None
            return {**_iv(c["interval"]), "place": c["place"], "seeds": list(c["per_seed"]),
                    "distances": list(c["per_seed"].values()), "inside": [c["inside"][s] for s in c["per_seed"]]}

        return {
            "protocol": self.protocol.as_dict(),
            "records": [r.as_dict() for r in self.records],
            "missing": [{"method": m.name, "seed": s} for m, s in self.missing],
            "power": {"weight": self.power["weight"], "detects": self.power["detects"], "line": self.power["line"],
                      "interval": _iv(self.power["interval"]) if self.power["interval"] else None},
            "comparisons": {rule: {"vs_vanilla": {m: {**_iv(v["interval"]), "word": v["word"], "seeds": v["seeds"]}
                                                  for m, v in c["vs_vanilla"].items()},
                                   "curve_at_equal_text": curve(c["curve_at_equal_text"]),
                                   "curve_at_equal_image": curve(c["curve_at_equal_image"])}
                            for rule, c in self.comparisons.items()},
            "multiplicity": multiplicity(self.comparisons),
        }


def _iv(iv) -> dict:
    return {k: (v if isinstance(v, int) or math.isfinite(v) else None)
            for k, v in {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n}.items()}

