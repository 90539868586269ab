"""CoMMIT: coordinated learning rates of the LLM side and the feature side from the balance coefficient kappa.

For a model with a feature side S (vision encoder / projector) and an LLM side X, both updated
by one optimizer step, the multimodal balance coefficient (CoMMIT, Definition 4.1) is

    kappa_t = d(P(X_t, S_t) || P(X_t+1, S_t)) / d(P(X_t, S_t) || P(X_t, S_t+1))

the drift of the batch's predicted token distributions when only the LLM's update is applied,
over the drift when only the feature side's update is applied (d: KL averaged over tokens).
kappa >> 1: learning leans to the LLM; kappa -> 0: to the feature side. With kappa~ the mean of
the last ``window`` measured kappas, the learning rates become

    lr_llm = 2 * base / (kappa~ + 1),    lr_feature = 2 * base / (1 / kappa~ + 1).

Measuring kappa costs two extra forwards (the parameters before the step are kept, then each
side is put back in turn); ``every`` measures every k-th step only. :class:`CoMMIT` works like
an LR scheduler over two parameter groups of an optimizer; ``regularize=True`` adds the paper's
drift regulariser (a loss term that rewards moving the output distribution; see
:meth:`CoMMIT.regularization`).

Several processes (DDP, torch.distributed with world size > 1): the drifts are token means over
every rank's measuring batch (the sums and the token count are all-reduced), so every rank
measures the same kappa, sets the same learning rates and the ranks' parameters stay equal.
Measuring ranks with their own kappa would give each rank other learning rates, and DDP's
averaged gradient would then move the replicas apart. Every rank must call :meth:`CoMMIT.step`
(or ``begin``/``end``) with ``forward`` on the same steps (the all-reduce is collective).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable

import torch

from ... import args

__all__ = ["CoMMIT", "kl_drift", "kappa_of", "coordinated_lrs"]


def _kl_tokens(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) per token in float64 ([N], the tokens `mask` selects)."""
    lp = torch.log_softmax(p_logits.to(torch.float64), dim=-1)
    lq = torch.log_softmax(q_logits.to(torch.float64), dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(dim=-1)
    return kl[mask.to(kl.device).bool()] if mask is not None else kl.flatten()


def kl_drift(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over tokens of KL(softmax(p) || softmax(q)) in float64 (0-d); ``mask`` selects tokens.

    Differentiable in both arguments (the regulariser differentiates the second).
    """
    kl = _kl_tokens(p_logits, q_logits, mask)
    return kl.mean() if kl.numel() else kl.sum()


def _global_drifts(kl_llm: torch.Tensor, kl_feature: torch.Tensor) -> tuple[float, float]:
    """(d_llm, d_feature): the token means, over every rank's tokens when torch.distributed runs with
    several processes (one all-reduce of the sums and the count: every rank gets the same numbers)."""
    totals = torch.stack([kl_llm.sum(), kl_feature.sum(), torch.tensor(float(kl_llm.numel()), dtype=torch.float64,
                                                                       device=kl_llm.device)])
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    d_llm, d_feature, count = totals.tolist()
    return (d_llm / count, d_feature / count) if count else (0.0, 0.0)


def kappa_of(d_llm: float, d_feature: float) -> float:
    """kappa = d_llm / d_feature; NaN unless both drifts are finite (a NaN logit on one side must not
    read as kappa = inf), inf when only the LLM side moved, NaN when neither did."""
    if not (math.isfinite(d_llm) and math.isfinite(d_feature)):
        return math.nan
    if d_feature > 0:
        return d_llm / d_feature
    return math.inf if d_llm > 0 else math.nan


def coordinated_lrs(base_llm: float, base_feature: float, kappa_avg: float) -> tuple[float, float]:
    """CoMMIT's Eq. 9: (2*base_llm / (kappa~ + 1), 2*base_feature / (1/kappa~ + 1))."""
    return 2.0 * base_llm / (kappa_avg + 1.0), 2.0 * base_feature / (1.0 / kappa_avg + 1.0)


class CoMMIT:
    """Coordinated learning rates for an optimizer with an LLM group and a feature group.

    Plain loop (it replaces ``optimizer.step()``)::

        sched = CoMMIT(optimizer, llm_group=0, feature_group=1)
        out = model(**inputs); loss.backward()   # or pl.backward(text=, image=)
        sched.step(forward=lambda: model(**inputs).logits, logits=out.logits, mask=labels != -100)
        optimizer.zero_grad()

    Args:
        optimizer: the optimizer (None: bind one later with :meth:`bind`, e.g. in a Trainer).
        llm_group, feature_group: indices of the two ``optimizer.param_groups``.
        base_lr: the base rate alpha of both sides (default: each group's lr at bind time).
        every: measure kappa every k-th step (other steps keep the rates).
        window: N_kappa, the number of measured kappas averaged.
        kappa_max: kappa is clipped to [1/kappa_max, kappa_max] for the rates (the reported
            kappa is not clipped; a step where neither side moved is not averaged).
        regularize, reg_weight: the drift regulariser (keeps the parameters before each step).
    """

    def __init__(self, optimizer=None, llm_group: int = 0, feature_group: int = 1, base_lr: float | None = None,
                 every: int = 1, window: int = 10, kappa_max: float = 1e3, regularize: bool = False,
                 reg_weight: float = 0.1):
        self.llm_group = args.integer("llm_group", llm_group, 0)
        self.feature_group = args.integer("feature_group", feature_group, 0)
        if self.llm_group == self.feature_group:
            raise ValueError("feature_group: expected a different parameter group than llm_group")
        self.base_lr = args.positive("base_lr", base_lr) if base_lr is not None else None
        self.every = args.integer("every", every, 1)
        window = args.integer("window", window, 1)
        self.kappa_max = args.number("kappa_max", kappa_max, 1.0, low_open=True)
        self.regularize = args.flag("regularize", regularize)
        self.reg_weight = args.number("reg_weight", reg_weight, 0.0)
        self.history: collections.deque[float] = collections.deque(maxlen=window)
        self.steps = 0
        self.overhead_s = 0.0
        self.last: dict[str, float] = {"kappa": math.nan, "d_llm": math.nan, "d_feature": math.nan}
        self._before: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._previous: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._ref: torch.Tensor | None = None
        self.optimizer = None
        if optimizer is not None:
            self.bind(optimizer)

    def bind(self, optimizer) -> None:
        groups = optimizer.param_groups
        for name, g in (("llm_group", self.llm_group), ("feature_group", self.feature_group)):
            if not 0 <= g < len(groups):
                raise ValueError(f"{name}: {g} out of range (the optimizer has {len(groups)} parameter groups)")
        self.optimizer = optimizer
        self.base_lrs = [self.base_lr or groups[i]["lr"] for i in (self.llm_group, self.feature_group)]
        self._apply()

    # -- the two sides ---------------------------------------------------------------------
    def _sides(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        pg = self.optimizer.param_groups
        return list(pg[self.llm_group]["params"]), list(pg[self.feature_group]["params"])

    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)

    def _snapshot(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        llm, feat = self._sides()
        return [p.detach().clone() for p in llm], [p.detach().clone() for p in feat]

    @property
    def kappa_avg(self) -> float:
        return sum(self.history) / len(self.history) if self.history else 1.0

    def lrs(self) -> tuple[float, float]:
        """(lr_llm, lr_feature) for the next step."""
        return coordinated_lrs(self.base_lrs[0], self.base_lrs[1], self.kappa_avg)

    def get_last_lr(self) -> list[float]:
        return list(self.lrs())

    def _apply(self) -> None:
        lr_llm, lr_feat = self.lrs()
        self.optimizer.param_groups[self.llm_group]["lr"] = lr_llm
        self.optimizer.param_groups[self.feature_group]["lr"] = lr_feat

    # -- one step --------------------------------------------------------------------------
    def measuring(self) -> bool:
        """Whether the coming step measures kappa."""
        return self.steps % self.every == 0

    def begin(self, forward: Callable[[], torch.Tensor] | None = None, logits: torch.Tensor | None = None) -> None:
        """Before ``optimizer.step()``: set the rates, keep the parameters (and the reference logits)."""
        self._apply()
        if self.measuring() or self.regularize:
            t0 = time.perf_counter()
            self._before = self._snapshot()
            if self.measuring():
                if logits is None and forward is not None:
                    with torch.no_grad():
                        logits = forward()
                self._ref = None if logits is None else logits.detach()
            self.overhead_s += time.perf_counter() - t0

    def end(self, forward: Callable[[], torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> float | None:
        """After ``optimizer.step()``: measure kappa (when due) with two forwards; returns it or None."""
        kappa = None
        if self.measuring() and forward is not None and self._ref is not None and self._before is not None:
            t0 = time.perf_counter()
            kappa = self._measure(forward, mask)
            self.overhead_s += time.perf_counter() - t0
        if self.regularize:
            self._previous = self._before
        self._before, self._ref = None, None
        self.steps += 1
        self._apply()
        return kappa

    def step(self, forward: Callable[[], torch.Tensor] | None = None, logits: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> float | None:
        """``optimizer.step()`` with kappa measured (when due) and the rates coordinated.

        ``forward()``: logits of the measuring batch with the current parameters (run under
        no_grad; keep dropout off or kappa is noisy); ``logits``: that batch's logits before the
        step (the training forward's, so no extra forward; else one more forward is run);
        ``mask``: the tokens the drift averages over (e.g. ``labels != -100``, aligned with logits).
        """
        self.begin(forward, logits)
        self.optimizer.step()
        return self.end(forward, mask)

    def _measure(self, forward, mask) -> float:
        (llm_old, feat_old), (llm, feat) = self._before, self._sides()
        llm_new, feat_new = [p.detach().clone() for p in llm], [p.detach().clone() for p in feat]
        with torch.no_grad():
            self._copy(feat, feat_old)  # only the LLM moved
            kl_llm = _kl_tokens(self._ref, forward(), mask)
            self._copy(feat, feat_new)
            self._copy(llm, llm_old)  # only the feature side moved
            kl_feat = _kl_tokens(self._ref, forward(), mask)
            self._copy(llm, llm_new)
        d_llm, d_feat = _global_drifts(kl_llm, kl_feat)
        kappa = kappa_of(d_llm, d_feat)
        if not math.isnan(kappa):  # a step without a usable kappa leaves the average as it was
            self.history.append(min(max(kappa, 1.0 / self.kappa_max), self.kappa_max))
        self.last = {"kappa": kappa, "d_llm": d_llm, "d_feature": d_feat}
        return kappa

    def regularization(self, forward: Callable[[], torch.Tensor], logits: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """``-reg_weight * KL(P(previous params) || P(current params))`` on this batch, to add to a loss.

        Its gradient pushes the output distribution away from where the last step started, i.e.
        rewards larger steps (the paper's Eq. 10-11 term, here with both sides moved together).
        One extra no-grad forward with the previous parameters; zero before the first step.
        """
        if not self.regularize:
            raise RuntimeError("regularization: construct CoMMIT with regularize=True")
        if self._previous is None:
            return logits.sum() * 0.0
        (llm_old, feat_old), (llm, feat) = self._previous, self._sides()
        llm_now, feat_now = [p.detach().clone() for p in llm], [p.detach().clone() for p in feat]
        with torch.no_grad():
            self._copy(llm, llm_old)
            self._copy(feat, feat_old)
            prev = forward()
            self._copy(llm, llm_now)
            self._copy(feat, feat_now)
        return -self.reg_weight * kl_drift(prev, logits, mask).to(logits.dtype)

    # -- reporting and state ----------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        lr_llm, lr_feat = self.lrs()
        return {"commit/kappa": self.last["kappa"], "commit/kappa_avg": self.kappa_avg, "commit/d_llm": self.last["d_llm"],
                "commit/d_feature": self.last["d_feature"], "commit/lr_llm": lr_llm, "commit/lr_feature": lr_feat,
                "commit/overhead_s": self.overhead_s}

    def state_dict(self) -> dict:
        return {"history": list(self.history), "steps": self.steps, "base_lrs": list(getattr(self, "base_lrs", [])),
                "last": dict(self.last), "overhead_s": self.overhead_s}

    def check_state(self, state) -> None:
        """ValueError("state: ...") unless `state` is a :meth:`state_dict` (nothing changes)."""
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a CoMMIT.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("history", "steps", "last", "overhead_s") if k not in state]
        if missing:
            raise ValueError(f"state: expected a CoMMIT.state_dict(), missing {', '.join(missing)}")
        try:
            history = state["history"]
            if not isinstance(history, (list, tuple)):
                raise ValueError(f"history: expected a list, got {type(history).__name__}")
            for k in history:
                args.positive("history", k)
            args.integer("steps", state["steps"], 0)
            args.number("overhead_s", state["overhead_s"], 0.0)
            last = state["last"]
            if not isinstance(last, dict) or set(last) != {"kappa", "d_llm", "d_feature"}:
                raise ValueError("last: expected a dict of kappa, d_llm, d_feature")
            for k, v in last.items():
                if not (isinstance(v, float) and math.isnan(v)):  # NaN: not measured
                    args.number(k, v, finite=False)
            base = state.get("base_lrs") or []
            if not isinstance(base, (list, tuple)) or len(base) not in (0, 2):
                raise ValueError("base_lrs: expected a list of two rates")
            for x in base:
                args.positive("base_lrs", x)
        except ValueError as err:
            raise ValueError(f"state: {err}") from None

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the whole state is checked before any of it is applied."""
        self.check_state(state)
        self.history.clear()
        self.history.extend(float(k) for k in state["history"])
        self.steps, self.last, self.overhead_s = int(state["steps"]), dict(state["last"]), float(state["overhead_s"])
        if state.get("base_lrs"):
            self.base_lrs = [float(x) for x in state["base_lrs"]]
        if self.optimizer is not None:
            self._apply()
