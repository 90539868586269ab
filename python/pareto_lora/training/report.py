"""StepReport: what one integration did, per group and per layer, fetched with one host sync.
"""

from __future__ import annotations

import torch

from ..flat import FlatStep, GradLayout
from ..result import stats_metrics
from ..rules import Case
from .report_base import ReportBase

__all__ = ["StepReport"]


def _metrics(stats: torch.Tensor) -> dict[str, list[float]]:
    nt, ni, cos, ratio = stats_metrics(stats.to(torch.float64))
    return {"norm_text": nt.tolist(), "norm_image": ni.tolist(), "cosine": cos.tolist(), "ratio": ratio.tolist()}


def _extra_values(step: FlatStep) -> dict[str, torch.Tensor]:
    """A balancer's 0-d quantities of the step as 1-element float64 tensors (FlatStep.extra)."""
    extra = getattr(step, "extra", None) or {}
    return {k: torch.as_tensor(v, dtype=torch.float64).reshape(1) for k, v in extra.items()}


class StepReport(ReportBase):
    """What one integration did, per group and per layer.

    Holds device tensors; the first access to a host value (``groups``, ``layers``,
    ``as_dict()``, ...) makes the one host sync of the step. Ratios are
    ||g_text|| / ||g_image|| (inf when the image gradient is zero, nan when both are).
    """

    def __init__(self, layout: GradLayout, step: FlatStep, losses: torch.Tensor, micro_batches: int, rule: str):
        super().__init__(layout, micro_batches, rule)
        self.step = step
        self._losses = losses

    def _fetch(self) -> dict:
        if self._host is None:
            s = self.step
            g, u = s.group_stats.shape[0], s.unit_stats.shape[0]
            extra = _extra_values(s)
            packed = torch.cat(
                [
                    s.unit_stats.reshape(-1).double(),
                    s.group_stats.reshape(-1).double(),
                    s.coeffs.reshape(-1).double(),
                    s.cases.double(),
                    self._losses.double(),
                    *(v.to(s.cases.device) for v in extra.values()),
                ]
            ).cpu()
            parts = torch.split(packed, [3 * u, 3 * g, 2 * g, g, 2, len(extra)])
            self._host = {
                "unit_stats": parts[0].reshape(u, 3),
                "group_stats": parts[1].reshape(g, 3),
                "coeffs": parts[2].reshape(g, 2).tolist(),
                "cases": [int(c) for c in parts[3].tolist()],
                "losses": parts[4].tolist(),
                "balancer": dict(zip(extra, parts[5].tolist())),
            }
        return self._host

    @property
    def balancer(self) -> dict[str, float]:
        """A balancer's quantities this step (``{"mimo/sigma_text": ..}``); empty for kernel rules."""
        return self._fetch()["balancer"]

    def add_metrics(self, metrics: dict[str, float]) -> None:
        """Merge host numbers of another method into :attr:`balancer` (e.g. ``CoMMIT.metrics()``),
        so that ``as_dict()``, ``to_record()`` and the diagnostics carry them too."""
        self._fetch()["balancer"].update({k: float(v) for k, v in metrics.items()})

    @property
    def loss_text(self) -> float:
        """Sum over the accumulated micro-batches of the (unscaled) text loss."""
        return self._fetch()["losses"][0]

    @property
    def loss_image(self) -> float:
        return self._fetch()["losses"][1]

    @property
    def groups(self) -> dict[str, dict[str, float]]:
        """group name -> norm_text, norm_image, cosine, ratio, alpha, beta, case."""
        h = self._fetch()
        m = _metrics(h["group_stats"])
        out = {}
        for i, name in enumerate(self.group_names):
            row = {k: v[i] for k, v in m.items()}
            row.update(alpha=h["coeffs"][i][0], beta=h["coeffs"][i][1], case=h["cases"][i])
            out[name] = row
        return out

    @property
    def layers(self) -> dict[str, dict[str, float]]:
        """unit name (layer0.., projector, other) -> norm_text, norm_image, cosine, ratio."""
        m = _metrics(self._fetch()["unit_stats"])
        return {name: {k: v[i] for k, v in m.items()} for i, name in enumerate(self.unit_names)}

    def as_dict(self, prefix: str = "pareto", layers: bool = False) -> dict[str, float]:
        """Flat ``{"pareto/group0/ratio": ..., "pareto/loss_text": ...}`` for loggers.

        ``layers=True`` adds ``pareto/layer{i}/{norm_text,norm_image,cosine,ratio}``; a balancer
        adds its quantities (``pareto/mimo/sigma_text``, ``pareto/gradnorm/w_image``, ...).
        """
        flat = {f"{prefix}/loss_text": self.loss_text, f"{prefix}/loss_image": self.loss_image}
        flat.update({f"{prefix}/{k}": float(v) for k, v in self.balancer.items()})
        for name, row in self.groups.items():
            for k, v in row.items():
                flat[f"{prefix}/{name}/{k}"] = float(v)
        if layers:
            for name, row in self.layers.items():
                for k, v in row.items():
                    flat[f"{prefix}/{name}/{k}"] = float(v)
        return flat

    def to_record(self) -> dict:
        """JSON-serialisable form (used by :mod:`pareto_lora.diagnostics`)."""
        return {
            "rule": self.rule,
            "micro_batches": self.micro_batches,
            "loss_text": self.loss_text,
            "loss_image": self.loss_image,
            "active": self.active.tolist(),
            "groups": self.groups,
            "layers": self.layers,
            "balancer": self.balancer,
        }

    def __repr__(self) -> str:
        rows = [f"StepReport(rule={self.rule!r}, micro_batches={self.micro_batches})"]
        for name, r in self.groups.items():
            rows.append(
                f"  {name:>10}: ratio={r['ratio']:.3g} cos={r['cosine']:+.3f} "
                f"alpha={r['alpha']:.3g} beta={r['beta']:.3g} case={Case(r['case']).name}"
            )
        return "\n".join(rows)
