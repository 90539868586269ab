"""CoMMIT as a transformers TrainerCallback: coordinated learning rates inside ``Trainer.train()``.

    opt = torch.optim.AdamW([{"params": llm_params}, {"params": feature_params}], lr=1e-4)
    commit = CoMMIT(llm_group=0, feature_group=1, every=4)
    trainer = ParetoLoRATrainer(model=..., args=..., optimizers=(opt, None), commit=commit)

(``ParetoLoRATrainer(commit=...)`` adds the callback itself and measures kappa on each window's last
micro-batch, reusing its training logits: two extra forwards per measured step.) With a plain
``transformers.Trainer`` add ``CoMMITCallback(commit, forward, logits=None)`` yourself, where
``forward()`` returns the logits of a probe batch (then one more forward gives the reference).

The Trainer's own LR scheduler keeps running: before each optimizer step the callback scales the
two groups' current rates by CoMMIT's factors 2/(kappa~+1) and 2/(1/kappa~+1), and puts them back
after the step.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import TrainerCallback

from .commit import CoMMIT

__all__ = ["CoMMITCallback"]


class CoMMITCallback(TrainerCallback):
    """Runs `commit` around every optimizer step of a Trainer.

    ``forward()``: logits of the measuring batch under the current parameters; ``logits()``: that
    batch's logits before the step, or None (an extra forward); ``mask()``: its token mask, or None.
    """

    def __init__(self, commit: CoMMIT, forward: Callable, logits: Callable | None = None, mask: Callable | None = None):
        self.commit, self.forward, self.logits, self.mask = commit, forward, logits, mask
        self._rates: list[float] | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        c = self.commit
        if c.optimizer is None:
            if optimizer is None:
                raise RuntimeError("CoMMITCallback: the Trainer passed no optimizer to its callbacks")
            c.bind(optimizer)
        groups = c.optimizer.param_groups
        self._rates = [g["lr"] for g in groups]
        if c.base_lr is None:  # follow the Trainer's schedule
            c.base_lrs = [groups[c.llm_group]["lr"], groups[c.feature_group]["lr"]]
        c.begin(self.forward, self.logits() if self.logits is not None else None)

    def on_optimizer_step(self, args, state, control, **kwargs):
        c = self.commit
        c.end(self.forward, self.mask() if self.mask is not None else None)
        if self._rates is not None:
            for g, lr in zip(c.optimizer.param_groups, self._rates):
                g["lr"] = lr
