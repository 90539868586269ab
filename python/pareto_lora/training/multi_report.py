"""MultiStepReport: what one K-objective integration did, per group and per layer, fetched with one host sync.

The K-objective counterpart of :class:`~pareto_lora.training.StepReport`: instead of (norm_text,
norm_image, cosine, ratio, alpha, beta) a group has K norms, the K x K cosines of its gradients
and the K weights the combine applied. Statistics rows are in the order of
:func:`pareto_lora.multi.pairs`.
"""

from __future__ import annotations

import torch

from ..flat import GradLayout
from ..multi import gram_matrix
from ..rules import Case
from .report_base import ReportBase

__all__ = ["MultiStepReport", "gram_metrics"]


def gram_metrics(stats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms [..., K], cosines [..., K, K]) of statistics rows [..., K(K+1)/2], in float64.

    A cosine is 0 where either norm is zero (as :func:`pareto_lora.result.stats_metrics`); a row
    with a NaN statistic gives NaN everywhere, never a made-up value.
    """
    gram = gram_matrix(stats.to(torch.float64), k)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    denom = norms[..., :, None] * norms[..., None, :]
    cos = torch.where(denom > 0, gram / torch.where(denom > 0, denom, 1.0), 0.0)
    bad = stats.isnan().any(-1)
    return torch.where(bad[..., None], torch.nan, norms), torch.where(bad[..., None, None], torch.nan, cos)


class MultiStepReport(ReportBase):
    """One K-objective step: per group norms, cosines, weights and case; per layer norms and cosines.

    Holds device tensors; the first host value read makes the one host sync of the step.
    """

    def __init__(self, layout: GradLayout, objectives: tuple[str, ...], unit_stats: torch.Tensor,
                 group_stats: torch.Tensor, weights: torch.Tensor, cases: torch.Tensor, losses: torch.Tensor,
                 micro_batches: int, rule: str):
        super().__init__(layout, micro_batches, rule)
        self.objectives = objectives
        self._device = (unit_stats, group_stats, weights, cases, losses)

    def _fetch(self) -> dict:
        if self._host is None:
            unit, group, weights, cases, losses = self._device
            k, p = len(self.objectives), unit.shape[-1]
            parts = [unit.reshape(-1), group.reshape(-1), weights.reshape(-1), cases, losses]
            packed = torch.cat([t.to(torch.float64) for t in parts]).cpu()
            u, g = unit.shape[0], group.shape[0]
            unit, group, weights, cases, losses = torch.split(packed, [u * p, g * p, g * k, g, k])
            self._host = {
                "units": gram_metrics(unit.reshape(u, p), k),
                "groups": gram_metrics(group.reshape(g, p), k),
                "group_stats": group.reshape(g, p),
                "weights": weights.reshape(g, k).tolist(),
                "cases": [int(c) for c in cases.tolist()],
                "losses": losses.tolist(),
            }
        return self._host

    def _rows(self, names, norms: torch.Tensor, cos: torch.Tensor) -> dict:
        objs = self.objectives
        return {name: {"norm": dict(zip(objs, norms[i].tolist())),
                       "cosine": {a: dict(zip(objs, cos[i, j].tolist())) for j, a in enumerate(objs)}}
                for i, name in enumerate(names)}

    @property
    def losses(self) -> dict[str, float]:
        """objective -> sum over the accumulated micro-batches of its (unscaled) loss."""
        return dict(zip(self.objectives, self._fetch()["losses"]))

    @property
    def group_stats(self) -> torch.Tensor:
        """[G, K(K+1)/2] float64 on the CPU: each group's Gram entries (order of pareto_lora.multi.pairs)."""
        return self._fetch()["group_stats"]

    @property
    def groups(self) -> dict[str, dict]:
        """group -> {"norm": {obj: ||g||}, "cosine": {obj: {obj: cos}}, "weights": {obj: w}, "case": int}."""
        h = self._fetch()
        rows = self._rows(self.group_names, *h["groups"])
        for i, row in enumerate(rows.values()):
            row["weights"] = dict(zip(self.objectives, h["weights"][i]))
            row["case"] = h["cases"][i]
        return rows

    @property
    def layers(self) -> dict[str, dict]:
        """unit (layer0.., named groups, other) -> {"norm": {obj: ..}, "cosine": {obj: {obj: ..}}}."""
        return self._rows(self.unit_names, *self._fetch()["units"])

    def as_dict(self, prefix: str = "pareto", layers: bool = False) -> dict[str, float]:
        """Flat ``{"pareto/loss_<obj>": .., "pareto/<group>/norm_<obj>": .., "pareto/<group>/cos_<a>_<b>": ..,
        "pareto/<group>/w_<obj>": .., "pareto/<group>/case": ..}`` for loggers (each pair a < b once)."""
        flat = {f"{prefix}/loss_{k}": v for k, v in self.losses.items()}
        rows = dict(self.groups)
        if layers:
            rows.update(self.layers)
        objs = self.objectives
        for name, row in rows.items():
            for a in objs:
                flat[f"{prefix}/{name}/norm_{a}"] = row["norm"][a]
            for i, a in enumerate(objs):
                for b in objs[i + 1:]:
                    flat[f"{prefix}/{name}/cos_{a}_{b}"] = row["cosine"][a][b]
            for a, w in row.get("weights", {}).items():
                flat[f"{prefix}/{name}/w_{a}"] = w
            if "case" in row:
                flat[f"{prefix}/{name}/case"] = float(row["case"])
        return flat

    def to_record(self) -> dict:
        """JSON-serialisable form."""
        return {"rule": self.rule, "objectives": list(self.objectives), "micro_batches": self.micro_batches,
                "losses": self.losses, "active": self.active.tolist(), "groups": self.groups, "layers": self.layers}

    def __repr__(self) -> str:
        rows = [f"MultiStepReport(rule={self.rule!r}, objectives={self.objectives}, micro_batches={self.micro_batches})"]
        for name, r in self.groups.items():
            norms = " ".join(f"{a}={v:.3g}" for a, v in r["norm"].items())
            weights = " ".join(f"{v:.3g}" for v in r["weights"].values())
            rows.append(f"  {name:>10}: |g| {norms}  w ({weights}) case={Case(r['case']).name}")
        return "\n".join(rows)
