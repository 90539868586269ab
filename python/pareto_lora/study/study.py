"""The runner: every (method, seed) of a protocol through the user's ``run``, each finished run logged at once.

The only module of :mod:`pareto_lora.study` that reads the package's method names (RULES and the
balancers, via training.balancers); the statistics below it are pure Python.
"""

from __future__ import annotations

from .. import args
from ..training.balancers import METHODS
from . import log as _log
from .protocol import Protocol
from .records import outcome
from .result import Result

__all__ = ["Study"]


class Study:
    """Paired-seed comparison of ParetoLoRA rules with vanilla LoRA and the loss-reweighting curve.

    Args:
        rules: rule names to compare: ``pareto_lora.RULES``, the balancers (``"mimo"``, ``"gradnorm"``)
            or ``"commit"`` (:data:`pareto_lora.training.balancers.METHODS`).
        weights: the reweighting curve ``L_text + w*L_image``: distinct positive ``w``, 1 among them
            (w = 1 is vanilla LoRA, the baseline of every comparison).
        seeds: distinct integers; a comparison pairs the methods' runs of one seed, so ``run`` must
            draw everything random (data order, LoRA init, dropout) from the seed. One seed is
            allowed, but gives no intervals (the report says so).
        log: None or a JSON-lines file: each finished run is appended at once, and a study whose
            log exists resumes where it stopped (a log written by another protocol is refused).
        higher_is_better, lower_is_better: names of extra metrics ``run`` returns, by direction;
            they are compared with vanilla only. ``"text"`` and ``"image"`` are always lower-is-better.
    """

    def __init__(self, rules, weights=(1, 2, 4, 8), seeds=range(5), log=None, *, higher_is_better=(),
                 lower_is_better=()):
        self.protocol = Protocol.build(rules, weights, seeds, higher_is_better, lower_is_better, known_rules=METHODS)
        if log is not None:
            _log.path_of(log)  # refuse a non-path now, before any run
        self.log = log

    def run(self, run, *, verbose: bool = False) -> Result:
        """``run(method, seed)`` for every method and seed not in the log yet; returns the :class:`Result`.

        ``run`` receives a :class:`~pareto_lora.study.protocol.Method` (``.rule``: a rule name or None;
        ``.weight``: the ``w`` of ``L_text + w*L_image`` when ``.rule`` is None) and the seed, trains and
        evaluates, and returns ``{"text": ..., "image": ..., <declared extras>: ...}`` (numbers; lower is
        better for text and image). Runs go seed by seed (all methods of seed 0, then seed 1, ...), so
        an interrupted study has complete pairs. A NaN or infinite metric records the run as failed;
        a returned value that is not such a dict raises ``ValueError`` (see docs/your_data.md). An
        exception inside ``run`` propagates; the log then holds every run finished before it.
        ``verbose``: print one line per finished run.
        """
        if not callable(run):
            raise ValueError(f"run: expected a callable run(method, seed) -> dict of metrics, got {args.shown(run)}")
        args.flag("verbose", verbose)
        records = _log.resume(self.log, self.protocol) if self.log is not None else []
        done = {(r.method, r.seed) for r in records}
        total = len(self.protocol.methods) * len(self.protocol.seeds)
        for seed in self.protocol.seeds:
            for method in self.protocol.methods:
                if (method, seed) in done:
                    continue
                record = outcome(self.protocol, method, seed, run(method, seed))
                if self.log is not None:
                    _log.append(self.log, record)
                records.append(record)
                if verbose:
                    status = f"FAILED ({record.failure})" if record.failure else \
                        ", ".join(f"{m} {v:.4g}" for m, v in record.metrics.items())
                    print(f"[{len(records)}/{total}] {method.name} seed {seed}: {status}", flush=True)
        return Result(self.protocol, records)
