"""What a step's report is, for two objectives (:class:`~pareto_lora.StepReport`) and K
(:class:`~pareto_lora.MultiStepReport`): device tensors fetched with one host sync, the layout's
names, and the case code of every group."""

from __future__ import annotations

import abc

from ..flat import GradLayout
from ..rules import Case

__all__ = ["ReportBase"]


class ReportBase(abc.ABC):
    """The part of a step report that does not depend on the number of objectives."""

    def __init__(self, layout: GradLayout, micro_batches: int, rule: str):
        self.group_names, self.unit_names, self.active = layout.group_names, layout.unit_names, layout.active
        self.micro_batches, self.rule = micro_batches, rule
        self._host: dict | None = None

    @abc.abstractmethod
    def _fetch(self) -> dict:
        """The step's host values (one device-to-host copy, made on the first call), with ``"cases"``."""

    @property
    def cases(self) -> list[int]:
        return self._fetch()["cases"]

    @property
    def nonfinite(self) -> bool:
        """Some group's gradient (or a loss) was not finite: the step must be skipped."""
        return int(Case.NONFINITE) in self.cases
