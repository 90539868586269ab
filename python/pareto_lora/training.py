"""Two-objective training step on a PEFT LoRA model: ParetoLoRA.

Typical use (one optimizer step per batch)::

    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", tau=0.5, num_groups=5, modulate="lower")
    out = model(**batch)
    loss_text, loss_image = pareto_lora.modality_losses(out.logits, batch["labels"],
                                                        image_token_mask=batch["image_token_mask"])
    report = pl.backward(text=loss_text, image=loss_image)   # integrated gradients now in .grad
    optimizer.step(); optimizer.zero_grad()

Gradient accumulation: call ``pl.backward(text=, image=, step=False)`` (or its alias
``pl.accumulate(text=, image=)``) on every micro-batch; each objective accumulates in its own
buffer. Then ``report = pl.integrate()`` runs the rule once on the accumulated gradients and
writes the result into ``.grad``. Scale the micro-batch losses as for plain accumulation
(divide by k, or normalise by the token counts of the whole accumulated batch).

Mixed precision: run the forward under ``torch.autocast``; with a ``torch.amp.GradScaler``
pass it as ``pl.backward(text=, image=, scaler=scaler)``: both losses get the same scale (the
rules are scale-invariant in direction, and ``mmpareto``'s magnitude is linear in it), and
then ``scaler.step(optimizer); scaler.update()`` as usual. A non-finite gradient leaves its
group with case NONFINITE (plain sum), so the inf/NaN reaches the scaler, which skips the
step. A non-finite *loss* (e.g. image-token logits masked to -inf) can still have finite
gradients; it raises FloatingPointError at ``integrate()`` without a scaler, and with one the
integrated gradient is set to NaN so that the scaler skips the step (``on_nonfinite``).

Gradient storage: every trainable parameter's gradient lives in two persistent flat buffers per
dtype (:class:`FlatGrads`), one per objective. The text gradient is taken with
``torch.autograd.grad`` and copied into the text buffer's views; the image gradient is
accumulated by an ordinary ``.backward()`` into ``param.grad``, which is a view of the image
buffer. The integration then runs on the two buffers and writes into the image buffer, i.e.
into ``.grad``: no per-step concatenation or allocation of gradient-sized tensors. (This split
is what a DDP communication hook needs: only the image backward triggers DDP's reduction.)

ParetoLoRA owns ``.grad`` of the model's trainable parameters: the first ``backward`` after
an ``integrate()`` starts a fresh accumulation from zero, whether or not ``zero_grad`` ran.
Activation checkpointing must be the non-reentrant kind (``use_reentrant=False``), because the
reentrant one does not support ``torch.autograd.grad``.

Several processes: pass the ``DistributedDataParallel`` model (ParetoLoRA registers its own
communication hook; keep DDP's default ``gradient_as_bucket_view=False``) or an FSDP2
``fully_shard`` model; the calls are the same and every rank gets the integrated gradient of
the global batch (see :mod:`pareto_lora.distributed`). With DDP, ``no_sync()`` accumulation
works as usual: the last micro-batch must run outside ``no_sync()``. Under DDP the integration
itself runs inside the communication hook, so ``.grad`` is integrated when that backward returns
and ``integrate()`` only checks the global losses and builds the report.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn

from . import distributed, ops
from .grouping import GradLayout, build_layout, is_lora_param
from .rules import Case, check_rule_params

__all__ = [
    "ParetoLoRA",
    "FlatGrads",
    "StepReport",
    "IntegrationStep",
    "unit_stats",
    "group_rule",
    "integrate_buffers",
]

NONFINITE_MODES = ("auto", "raise", "skip")


def _local_shape(p: torch.Tensor) -> torch.Size:
    # A sharded (DTensor) parameter's gradient buffer holds only this rank's shard.
    to_local = getattr(p, "to_local", None)
    return to_local().shape if callable(to_local) else p.shape


class FlatGrads:
    """One persistent flat gradient buffer per bucket (dtype) of `layout`, and per-parameter views."""

    def __init__(self, layout: GradLayout):
        self.flats = [torch.zeros(b.numel, dtype=b.dtype, device=layout.device) for b in layout.buckets]
        views: list[torch.Tensor | None] = [None] * len(layout.params)
        for flat, bucket in zip(self.flats, layout.buckets):
            for i, off in zip(bucket.param_index, bucket.param_offset):
                shape = _local_shape(layout.params[i])
                views[i] = flat[off : off + shape.numel()].view(shape)
        self.views: list[torch.Tensor] = views  # type: ignore[assignment]

    def zero_(self) -> None:
        for f in self.flats:
            f.zero_()


# ---- the integration step on flat buffers (reusable per bucket / per rank) ----------------------
@dataclasses.dataclass
class IntegrationStep:
    """Device tensors of one integration: unit and group statistics, coefficients, cases."""

    unit_stats: torch.Tensor  #: [U, 3]: ||g_text||^2, ||g_image||^2, g_text.g_image per unit
    group_stats: torch.Tensor  #: [G, 3]
    coeffs: torch.Tensor  #: [G, 2]: (alpha, beta), out = alpha*g_text + beta*g_image
    cases: torch.Tensor  #: [G] int32 (pareto_lora.Case)


def unit_stats(pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], backend: str = "auto") -> torch.Tensor:
    """Sum over (text_flat, image_flat, unit_offsets) pairs of per-unit statistics -> [U, 3].

    Statistics are additive, so a caller holding a slice of the buffers (one bucket, one
    rank) can compute its part, reduce it, and pass the total to :func:`group_rule`.
    """
    total = None
    for a, b, offsets in pairs:
        s = ops.segment_stats(a, b, offsets, backend=backend)
        if total is None:
            total = s.clone() if s.dtype == torch.float64 else s.to(torch.float32)
        else:
            total = total.to(torch.promote_types(total.dtype, s.dtype)) + s
    if total is None:
        raise ValueError("pairs: expected at least one (text, image, offsets) buffer pair")
    return total


def group_rule(
    stats_per_unit: torch.Tensor,
    unit_group: torch.Tensor,
    active: torch.Tensor,
    rule: str,
    tau: float,
    gamma: float = 1.0,
    symmetric: bool = False,
    backend: str = "auto",
) -> IntegrationStep:
    """Sum unit statistics into groups and run the rule on each group."""
    group_stats = ops.sum_into_groups(stats_per_unit, unit_group, active.numel())
    coeffs, cases = ops.rule_coefficients(group_stats, rule, tau, active, gamma, symmetric, backend=backend)
    return IntegrationStep(stats_per_unit, group_stats, coeffs, cases)


def integrate_buffers(
    text: Sequence[torch.Tensor],
    image: Sequence[torch.Tensor],
    layout: GradLayout,
    out: Sequence[torch.Tensor] | None = None,
    rule: str = "pareto_lora",
    tau: float = 0.5,
    gamma: float = 1.0,
    symmetric: bool = False,
    poison: torch.Tensor | None = None,
    backend: str = "auto",
    stats_per_unit: torch.Tensor | None = None,
) -> IntegrationStep:
    """stats (per unit) -> rule (per group) -> combine, on the flat buffers of `layout`'s buckets.

    ``out`` defaults to ``image`` (in place). ``stats_per_unit`` ([U, 3]) replaces the
    statistics pass when the caller has them already (reduced across ranks). ``poison`` is an optional 0-d bool device tensor:
    when true the coefficients become NaN, so the whole output is NaN (a GradScaler then skips
    the step) and every case reads NONFINITE; it costs no host sync.
    """
    out = image if out is None else out
    pairs = [(a, b, bk.unit_offsets) for a, b, bk in zip(text, image, layout.buckets)]
    if stats_per_unit is None:
        stats_per_unit = unit_stats(pairs, backend)
    step = group_rule(stats_per_unit, layout.unit_group, layout.active, rule, tau, gamma, symmetric, backend)
    unit_coeffs = step.coeffs[layout.unit_group]
    if poison is not None:
        unit_coeffs = unit_coeffs * torch.where(poison, math.nan, 1.0)
        step.cases = torch.where(poison, torch.full_like(step.cases, int(Case.NONFINITE)), step.cases)
    for (a, b, offsets), o in zip(pairs, out):
        ops.combine(a, b, offsets, unit_coeffs, out=o, backend=backend)
    return step


# ---- report -------------------------------------------------------------------------------------
def _metrics(stats: torch.Tensor) -> dict[str, list[float]]:
    nt, ni, cos, ratio = ops.stats_metrics(stats.to(torch.float64))
    return {"norm_text": nt.tolist(), "norm_image": ni.tolist(), "cosine": cos.tolist(), "ratio": ratio.tolist()}


class StepReport:
    """What one integration did, per group and per layer.

    Holds device tensors; the first access to a host value (``groups``, ``layers``,
    ``as_dict()``, ...) makes the one host sync of the step. Ratios are
    ||g_text|| / ||g_image|| (inf when the image gradient is zero, nan when both are).
    """

    def __init__(self, layout: GradLayout, step: IntegrationStep, losses: torch.Tensor, micro_batches: int, rule: str):
        self.group_names = layout.group_names
        self.unit_names = layout.unit_names
        self.active = layout.active
        self.step = step
        self._losses = losses
        self.micro_batches = micro_batches
        self.rule = rule
        self._host: dict | None = None

    def _fetch(self) -> dict:
        if self._host is None:
            s = self.step
            g, u = s.group_stats.shape[0], s.unit_stats.shape[0]
            packed = torch.cat(
                [
                    s.unit_stats.reshape(-1).double(),
                    s.group_stats.reshape(-1).double(),
                    s.coeffs.reshape(-1).double(),
                    s.cases.double(),
                    self._losses.double(),
                ]
            ).cpu()
            parts = torch.split(packed, [3 * u, 3 * g, 2 * g, g, 2])
            self._host = {
                "unit_stats": parts[0].reshape(u, 3),
                "group_stats": parts[1].reshape(g, 3),
                "coeffs": parts[2].reshape(g, 2).tolist(),
                "cases": [int(c) for c in parts[3].tolist()],
                "losses": parts[4].tolist(),
            }
        return self._host

    @property
    def loss_text(self) -> float:
        """Sum over the accumulated micro-batches of the (unscaled) text loss."""
        return self._fetch()["losses"][0]

    @property
    def loss_image(self) -> float:
        return self._fetch()["losses"][1]

    @property
    def cases(self) -> list[int]:
        return self._fetch()["cases"]

    @property
    def nonfinite(self) -> bool:
        """Some group's gradient (or a loss) was not finite: the step must be skipped."""
        return int(Case.NONFINITE) in self.cases

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

        ``layers=True`` adds ``pareto/layer{i}/{norm_text,norm_image,cosine,ratio}``.
        """
        flat = {f"{prefix}/loss_text": self.loss_text, f"{prefix}/loss_image": self.loss_image}
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
        }

    def __repr__(self) -> str:
        rows = [f"StepReport(rule={self.rule!r}, micro_batches={self.micro_batches})"]
        for name, r in self.groups.items():
            rows.append(
                f"  {name:>10}: ratio={r['ratio']:.3g} cos={r['cosine']:+.3f} "
                f"alpha={r['alpha']:.3g} beta={r['beta']:.3g} case={Case(r['case']).name}"
            )
        return "\n".join(rows)


# ---- the training-loop object -----------------------------------------------------------------
def _check_loss(name: str, loss) -> None:
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"{name}: expected a loss Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{name}: the loss does not require grad (computed under torch.no_grad(), detached, "
            "or the model has no trainable parameters)"
        )


def _reaches(loss: torch.Tensor, targets: set[int]) -> bool:
    """Whether the autograd graph of `loss` accumulates into any parameter whose id is in `targets`."""
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # AccumulateGrad nodes carry their leaf
        if var is not None and id(var) in targets:
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


class ParetoLoRA:
    """Modality-balanced gradient integration for a PEFT LoRA model (two objectives: text, image).

    Args:
        model: a PEFT model (``peft.get_peft_model``) or any module with PEFT LoRA layers.
        rule: integration rule (``pareto_lora.RULES``) for the modulated groups.
        tau: imbalance threshold on ||g_text|| / ||g_image||.
        num_groups: consecutive layer groups of the layer stack (``numpy.array_split`` sizes), or
            ``"per_layer"``.
        modulate: groups that get the rule: "lower", "middle", "upper", "all", "projector",
            "none", a group index (the projector group is index ``num_groups``) or a list of
            them. Other groups, and non-LoRA trainable parameters, get g_text + g_image.
        gamma, symmetric: rule parameters (see ``pareto_lora.integrate``).
        layers_path: name of the decoder-layer ModuleList when auto-detection cannot tell.
        on_nonfinite: what a non-finite loss does at ``integrate()``: "raise"
            (FloatingPointError), "skip" (NaN gradients, for a GradScaler to skip the step) or
            "auto" (skip when a scaler was passed to ``backward``, else raise).
        backend: backend of the integration ops (``pareto_lora.available_backends()``).
    """

    def __init__(
        self,
        model: nn.Module,
        rule: str = "pareto_lora",
        tau: float = 0.5,
        num_groups: int | str = 5,
        modulate="lower",
        *,
        gamma: float = 1.0,
        symmetric: bool = False,
        layers_path: str | None = None,
        on_nonfinite: str = "auto",
        backend: str = "auto",
    ):
        check_rule_params(rule, tau, gamma)
        if on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite: expected one of {', '.join(NONFINITE_MODES)}, got {on_nonfinite!r}")
        self._sync = distributed.make_sync(model)
        module = model if self._sync is None else self._sync.module
        self.layout = build_layout(module, num_groups=num_groups, modulate=modulate, layers_path=layers_path)
        if isinstance(self._sync, distributed.FSDPSync):
            self.layout = distributed.local_layout(self.layout)
        ops.resolve_backend(backend, self.layout.device)
        self.rule, self.tau, self.gamma, self.symmetric = rule, float(tau), float(gamma), bool(symmetric)
        self.on_nonfinite, self.backend = on_nonfinite, backend
        self.text = FlatGrads(self.layout)
        self.image = FlatGrads(self.layout)
        if self._sync is not None:
            self._sync.bind(self.layout, self.text.views, self.image.views, backend, self._rule)
        self._lora_ids = {id(p) for p, n in zip(self.layout.params, self.layout.names) if is_lora_param(n)}
        self._image_reach_checked = False
        self.last_report: StepReport | None = None
        self._reset()

    def _rule(self, group_stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(coeffs, cases) of every group under the current settings (called by the DDP hook)."""
        return ops.rule_coefficients(
            group_stats, self.rule, self.tau, self.layout.active, self.gamma, self.symmetric, backend=self.backend
        )

    def _reset(self) -> None:
        dev = self.layout.device
        self._micro = 0
        self._losses = torch.zeros(2, dtype=torch.float64, device=dev)
        self._bad = torch.zeros(2, dtype=torch.bool, device=dev)
        self._scaled = False

    @property
    def micro_batches(self) -> int:
        """Micro-batches accumulated since the last ``integrate()``."""
        return self._micro

    def _attach_image_views(self) -> None:
        params, views = self.layout.params, self.image.views
        if self._micro == 0:
            self.image.zero_()
            for p, v in zip(params, views):
                if p.grad is not v:
                    p.grad = v
            return
        if any(p.grad is not v for p, v in zip(params, views)):
            raise RuntimeError(
                "backward: the gradients were reset or replaced during gradient accumulation "
                "(optimizer.zero_grad() between accumulate() calls?); call it after integrate()"
            )

    def _add_losses(self, text: torch.Tensor, image: torch.Tensor, scaler) -> None:
        losses = torch.stack([text.detach(), image.detach()]).reshape(2).to(torch.float64)
        self._losses += losses
        self._bad |= ~torch.isfinite(losses)
        self._scaled |= scaler is not None

    def accumulate(self, text: torch.Tensor, image: torch.Tensor, scaler=None) -> None:
        """Add one micro-batch's text and image gradients to their buffers (no integration)."""
        self.backward(text=text, image=image, step=False, scaler=scaler)

    def backward(self, text: torch.Tensor, image: torch.Tensor, step: bool = True, scaler=None) -> StepReport | None:
        """Backpropagate both objectives of one forward pass; with ``step=True`` also integrate.

        ``scaler``: an optional ``torch.amp.GradScaler``; both losses are scaled by it.
        Returns the :class:`StepReport` when ``step`` is true, else None.
        """
        _check_loss("text", text)
        _check_loss("image", image)
        params = self.layout.params
        t_loss, i_loss = (scaler.scale(text), scaler.scale(image)) if scaler is not None else (text, image)
        if isinstance(self._sync, distributed.FSDPSync):
            # FSDP2 computes forward/backward with unsharded copies of the parameters, so
            # autograd.grad cannot target them; both objectives take an ordinary backward.
            self._sync.backward(t_loss, i_loss, self.text.views, self.image.views, first=self._micro == 0)
            self._add_losses(text, image, scaler)
            self._micro += 1
            return self.integrate() if step else None

        grads = torch.autograd.grad(t_loss, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and id(p) in self._lora_ids for p, g in zip(params, grads)):
            raise ValueError("text: the loss does not depend on any trainable LoRA parameter")
        if not self._image_reach_checked:
            # A graph walk; once is enough to catch a loss built from the wrong tensors.
            if not _reaches(i_loss, self._lora_ids):
                raise ValueError("image: the loss does not depend on any trainable LoRA parameter")
            self._image_reach_checked = True

        self._attach_image_views()
        if self._micro and isinstance(self._sync, distributed.DDPSync):
            self._sync.restore_reduced()
        views = self.text.views
        got = [(v, g) for v, g in zip(views, grads) if g is not None]
        if self._micro == 0:
            if len(got) < len(views):
                for v, g in zip(views, grads):
                    if g is None:
                        v.zero_()
            torch._foreach_copy_([v for v, _ in got], [g for _, g in got])
        else:
            torch._foreach_add_([v for v, _ in got], [g for _, g in got])
        del grads, got
        # Added before the image backward: under DDP the hook carries the running totals across ranks.
        self._add_losses(text, image, scaler)
        if self._sync is not None:
            self._sync.before_backward(self._losses)
        i_loss.backward()
        if isinstance(self._sync, distributed.DDPSync):
            error = self._sync.failure()
            if error is not None:
                # DDP has finished the step with NaN buckets; the accumulation is lost.
                for flat in self.image.flats:
                    flat.fill_(math.nan)
                self._reset()
                raise error
        self._micro += 1
        return self.integrate() if step else None

    def integrate(self) -> StepReport:
        """Run the rule once on the accumulated gradients; the result is written into ``.grad``.

        Under DDP the communication hook has done the integration during the last backward;
        this only checks the (then globally known) losses and assembles the report.
        """
        if self._micro == 0:
            raise RuntimeError("integrate: no gradients accumulated since the last step; call backward()/accumulate() first")
        in_hook = isinstance(self._sync, distributed.DDPSync)
        stats = None
        if in_hook:
            step = IntegrationStep(*self._sync.finish())
            # The losses rode in the last bucket: they are the global ones now.
            self._bad = self._bad | ~torch.isfinite(self._losses)
        elif self._sync is not None:
            # Global statistics and losses first, so that every rank takes the same branch below.
            stats, self._losses = self._sync.global_stats(self.text.flats, self.image.flats, self._losses)
            self._bad = self._bad | ~torch.isfinite(self._losses)
        poison = self._nonfinite_poison(integrated=in_hook)
        if in_hook:
            if poison is not None:
                # After the fact (the hook could not know the global losses): one more pass over
                # .grad, free of host syncs; NaN makes a GradScaler skip the step.
                factor = torch.where(poison, math.nan, 1.0)
                for flat in self.image.flats:
                    flat.mul_(factor)
                step.cases = torch.where(poison, torch.full_like(step.cases, int(Case.NONFINITE)), step.cases)
        else:
            step = integrate_buffers(
                self.text.flats,
                self.image.flats,
                self.layout,
                rule=self.rule,
                tau=self.tau,
                gamma=self.gamma,
                symmetric=self.symmetric,
                poison=poison,
                backend=self.backend,
                stats_per_unit=stats,
            )
            if isinstance(self._sync, distributed.FSDPSync):
                self._sync.write_grads(self.image.views)
        report = StepReport(self.layout, step, self._losses, self._micro, self.rule)
        self.last_report = report
        self._reset()
        return report

    def _nonfinite_poison(self, integrated: bool) -> torch.Tensor | None:
        """A 0-d device bool (poison the step) in "skip" mode; in "raise" mode raise on a non-finite loss.

        ``integrated``: ``.grad`` already holds an integration (DDP hook); a refused step then
        leaves it NaN, so that an optimizer step after a caught exception cannot apply it.
        """
        mode = self.on_nonfinite
        if mode == "auto":
            mode = "skip" if self._scaled else "raise"
        if mode != "raise":
            return self._bad.any()
        bad = self._bad.tolist()
        if any(bad):
            losses = self._losses.tolist()
            if integrated:
                for flat in self.image.flats:
                    flat.fill_(math.nan)
            self._reset()
            which = " and ".join(n for n, b in zip(("text", "image"), bad) if b)
            raise FloatingPointError(
                f"{which} loss is not finite ({', '.join(f'{x}' for x in losses)}); refusing to step. "
                "(Masked image-token logits, e.g. Chameleon's -inf, give an infinite image loss.) "
                "Use on_nonfinite='skip' with a GradScaler to skip such steps instead."
            )
        return None

    def describe(self) -> str:
        return self.layout.describe()
