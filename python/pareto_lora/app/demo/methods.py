"""How the demo runs each method: the kernel rules, MIMO, GradNorm and CoMMIT, built for one fine-tuning run.

* kernel rules (``pareto_lora.RULES``): ``ParetoLoRA(rule, tau, num_groups, modulate)``;
* ``mimo``: MIMO's one-backward mode (every LoRA parameter weighted by 1 + lam*sigma_k; lam 10, mu 0.1,
  running-minimum floors): the paper's global form, at a vanilla step's cost;
* ``gradnorm``: GradNorm weights on every group (``modulate="all"``), the norms balanced over the
  whole layer stack (alpha 1.5, weight lr 0.025);
* controls and the reweighting frontier (``CONTROLS``): vanilla gradients of ``a*L_text + b*L_image``
  -- ``text_only`` (1, 0) and ``image_only`` (0, 1) bracket what fine-tuning can move, ``w2`` ..
  ``w64`` (1, w) trace the trade-off a practitioner gets by tuning one loss weight (``sum`` is w = 1).
  ``plain_backward="two"`` (the studies) takes their two per-modality gradients through ParetoLoRA's
  ``sum`` rule, so their per-layer gradient statistics are recorded; ``"one"`` (the default demo) takes
  one backward of the weighted loss, as a user of plain reweighting runs it (:class:`OneBackward`:
  F + B instead of F + 2B, the same gradient up to rounding, no per-layer statistics);
* ``VARIANTS``: ``pareto_lora_all``, the paper's rule on every layer group (``modulate="all"``),
  ``pareto_lora_m0.1``, its conflict branch only on cos < -0.1 (``RuleSpec.margin``: text and image
  gradients are nearly orthogonal, so cos < 0 alone fires on noise), ``pareto_lora_ema0.9`` (the
  rule on statistics averaged over steps) and ``pareto_lora_norm`` (``preserve_norm=True``);
* ``commit``: vanilla gradients (``sum``) and CoMMIT's coordinated learning rates. The demo model has
  no separate vision encoder, so the LoRA of the lowest layer group (the layers that first read the
  image codes) plays the feature side and the rest of the stack the LLM side; kappa is measured
  every ``COMMIT_EVERY`` steps on the training batch (two extra forwards each).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

import pareto_lora
from pareto_lora.training.balancers import BALANCERS, METHODS, Balancer, CoMMIT, GradNorm, MIMO

__all__ = ["METHODS", "CONTROLS", "VARIANTS", "ALL_METHODS", "FAMILY", "OPTIMIZERS", "PLAIN_BACKWARDS", "Method",
           "OneBackward", "build_method", "make_optimizer", "describe_methods", "loss_weights", "frontier_weight", "is_plain",
           "takes_one_backward"]

#: the demo's optimizers: AdamW (the main study; scale-invariant per coordinate) and plain SGD
#: (no momentum, no weight decay: its step is the learning rate times the integrated gradient)
OPTIMIZERS = ("adamw", "sgd")

COMMIT_EVERY = 2
#: name -> (text weight, image weight) of the plain-sum runs that are not rules
CONTROLS: dict[str, tuple[float, float]] = {
    "text_only": (1.0, 0.0), "image_only": (0.0, 1.0),
    **{f"w{w:g}": (1.0, float(w)) for w in (1.5, 2, 3, 4, 6, 8, 16, 32, 64)},  # w16..w64: digits-strong's curve
}
#: name -> (kernel rule, modulate or None = the config's, conflict margin, ParetoLoRA options):
#: variants of a kernel rule
VARIANTS: dict[str, tuple[str, str | None, float, dict]] = {
    "pareto_lora_all": ("pareto_lora", "all", 0.0, {}),
    "pareto_lora_m0.1": ("pareto_lora", None, 0.1, {}),
    "pareto_lora_ema0.9": ("pareto_lora", None, 0.0, {"stats_ema": 0.9}),
    "pareto_lora_norm": ("pareto_lora", None, 0.0, {"preserve_norm": True}),
}
ALL_METHODS: tuple[str, ...] = (*METHODS, *VARIANTS, *CONTROLS)
#: the gradient-manipulation family (torchjd's aggregators as per-group kernel rules, docs/rules.md)
#: in both worlds' ``--full`` studies. ``constant`` is left out: it is the reweighting curve itself.
FAMILY: tuple[str, ...] = ("mean", "upgrad", "pcgrad", "dualproj", "imtl_g", "cagrad", "nash_mtl", "aligned_mtl",
                           "config")


#: how the runs without gradient integration (``is_plain``) take their gradients (module docstring)
PLAIN_BACKWARDS = ("two", "one")


class OneBackward(Balancer):
    """One backward of ``L_text + L_image`` (the demo has weighted the losses already): a plain
    run's step at a plain step's cost, through ParetoLoRA's one-backward path, so that a non-finite
    loss is refused and the report keeps its layout (its statistics read NaN: none are taken)."""

    name = "one_backward"
    one_backward = True

    def loss_weights(self, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        one = torch.ones((), dtype=torch.float64, device=self.device)
        return one, one


def is_plain(name: str) -> bool:
    """Whether method `name` steps on the plain (weighted) sum: vanilla, the curve and the brackets."""
    return name == "sum" or name in CONTROLS


def takes_one_backward(name: str, cfg) -> bool:
    """Whether method `name` runs in one backward under `cfg` (a plain run with ``plain_backward="one"``;
    the digits world's config has no such field: its plain runs always take two)."""
    return is_plain(name) and getattr(cfg, "plain_backward", "two") == "one"


def loss_weights(name: str) -> tuple[float, float]:
    """(text, image) loss weights of method `name`: (1, 1) for every rule (the rule does the weighting)."""
    return CONTROLS.get(name, (1.0, 1.0))


def frontier_weight(name: str) -> float | None:
    """The image weight w of a point of the reweighting curve (``sum`` is w = 1), else None."""
    if name == "sum":
        return 1.0
    return CONTROLS[name][1] if name.startswith("w") and name in CONTROLS else None


@dataclasses.dataclass
class Method:
    """What one run steps with: the ParetoLoRA object, the optimizer, and CoMMIT (or None)."""

    pl: pareto_lora.ParetoLoRA
    optimizer: torch.optim.Optimizer
    commit: CoMMIT | None = None
    warning: str | None = None  # the library's check_optimizer warning (norm-increasing rule under SGD)

    def step(self, forward, logits, mask) -> None:
        """``optimizer.step()``, through CoMMIT when the method has it."""
        if self.commit is None:
            self.optimizer.step()
        else:
            self.commit.step(forward=forward, logits=logits, mask=mask)


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over `params` (tensors or param groups) at ``cfg.lr``, no weight decay."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)


def build_method(model, name: str, cfg) -> Method:
    """The ParetoLoRA and optimizer (and CoMMIT) of method `name` for `model` under the demo config."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if takes_one_backward(name, cfg):
        pl = pareto_lora.ParetoLoRA(model, balancer=OneBackward(), num_groups=cfg.num_groups, modulate="all")
    elif name in BALANCERS:
        balancer = MIMO(lam=10.0, mu=0.1) if name == "mimo" else GradNorm(alpha=1.5, lr=0.025)
        modulate = cfg.modulate if name == "mimo" else "all"  # MIMO's one-backward mode weights every parameter
        pl = pareto_lora.ParetoLoRA(model, rule=balancer, num_groups=cfg.num_groups, modulate=modulate)
    else:
        plain = ("sum" if name == "commit" or name in CONTROLS else name, None, 0.0, {})
        rule, modulate, margin, options = VARIANTS.get(name, plain)
        spec = pareto_lora.RuleSpec(rule, tau=cfg.tau, margin=margin)
        pl = pareto_lora.ParetoLoRA(model, rule=spec, num_groups=cfg.num_groups, modulate=modulate or cfg.modulate,
                                    **options)
    if name != "commit":
        opt = make_optimizer([p for _, p in trainable], cfg)
        with warnings.catch_warnings():  # kept in the run's record, not printed once per run
            warnings.simplefilter("ignore")
            return Method(pl, opt, warning=pl.check_optimizer(opt))
    lower = set(pl.layout.group_layers[0])
    layer = {n: next((i for i in lower if f".layers.{i}." in n), None) for n, _ in trainable}
    feature = [p for n, p in trainable if layer[n] is not None]
    llm = [p for n, p in trainable if layer[n] is None]
    opt = make_optimizer([{"params": llm}, {"params": feature}], cfg)
    return Method(pl, opt, CoMMIT(opt, llm_group=0, feature_group=1, every=COMMIT_EVERY, window=10))


def describe_methods(names) -> str:
    """One line on the non-kernel methods among `names` (for the demo's setup text)."""
    parts = []
    if "mimo" in names:
        parts.append("mimo = MIMO one-backward (lam 10, mu 0.1, running-min floors)")
    if "gradnorm" in names:
        parts.append("gradnorm = GradNorm on all groups (alpha 1.5)")
    if "commit" in names:
        parts.append(f"commit = vanilla gradients + CoMMIT rates (feature side = LoRA of layer group 0, "
                     f"kappa every {COMMIT_EVERY} steps)")
    return "; ".join(parts)
