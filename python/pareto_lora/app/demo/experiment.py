"""The demo experiment: pre-train a tiny base model, then LoRA-fine-tune it once per rule and seed.

Within one seed every rule starts from the same pre-trained base, the same LoRA initialisation
and sees the same batches in the same order, so the rules differ only in how the text and image
gradients are combined. The gradients go through :class:`pareto_lora.ParetoLoRA` exactly as in
a user's training loop; rule ``"sum"`` is vanilla LoRA (g_text + g_image everywhere).
May import: the public package (:mod:`pareto_lora`) and its sibling modules.
"""

from __future__ import annotations

import dataclasses
import time

import torch

import pareto_lora

from .data import Vocab, World, fixed_batches, make_world, sample_batch
from .methods import METHODS, build_method
from .model import ModelConfig, attach_lora, build_base_model, pretrain

__all__ = ["DemoConfig", "RunResult", "evaluate", "finetune", "run_experiment"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    rules: tuple[str, ...] = METHODS  # the kernel rules, then mimo, gradnorm, commit (methods.py)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 80
    batch_size: int = 32
    lr: float = 1e-3
    pretrain_steps: int = 150
    pretrain_lr: float = 3e-3
    eval_every: int = 20
    eval_batches: int = 2
    eval_batch_size: int = 64
    tau: float = 0.5
    num_groups: int = 3
    modulate: str = "lower"
    pretrain_world_seed: int = 1
    finetune_world_seed: int = 2
    image_noise: float = 0.15
    num_templates: int = 8
    device: str = "cpu"
    # Intra-op threads on CPU. The model is tiny, so a second thread gains ~1.4x when the cores are
    # idle but stalls for seconds per step when another process holds a core: 1 is the robust default.
    threads: int | None = 1
    model: ModelConfig = ModelConfig()
    vocab: Vocab = Vocab()

    def check(self) -> None:
        """ValueError naming the field for values the experiment cannot run with."""
        bad = [r for r in self.rules if r not in METHODS]
        if bad or not self.rules:
            raise ValueError(f"rules: unknown rule(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                             f"expected names from {', '.join(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected an integer >= 1 or None, got {self.threads}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps: expected an integer >= 0, got {self.pretrain_steps}")
        for name in ("lr", "pretrain_lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        if not 1 <= self.num_groups <= self.model.num_layers:
            raise ValueError(f"num_groups: expected 1..{self.model.num_layers} (the model's layers), got {self.num_groups}")


@dataclasses.dataclass
class RunResult:
    """One (rule, seed) fine-tuning run."""

    rule: str
    seed: int
    eval_steps: list[int]
    eval_text: list[float]  # held-out text loss at eval_steps (step 0 = before fine-tuning)
    eval_image: list[float]
    records: list[dict]  # one StepReport.to_record() per training step (plus "step")
    seconds: float

    @property
    def final_text(self) -> float:
        return self.eval_text[-1]

    @property
    def final_image(self) -> float:
        return self.eval_image[-1]


@torch.no_grad()
def evaluate(model, batches, device) -> tuple[float, float]:
    """Held-out (text, image) next-token cross-entropy, token-weighted over `batches`."""
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    for batch in batches:
        batch = batch.to(device)
        logits = model(**batch.model_inputs()).logits
        losses = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask)
        n = pareto_lora.modality_token_counts(batch.labels, image_token_mask=batch.image_token_mask)
        for i in range(2):
            sums[i] += float(losses[i]) * int(n[i])
            counts[i] += int(n[i])
    model.train()
    return sums[0] / max(counts[0], 1), sums[1] / max(counts[1], 1)


def finetune(base, cfg: DemoConfig, rule: str, seed: int, world: World, eval_set, progress=None) -> RunResult:
    """LoRA fine-tuning of a copy of `base` on `world` with gradient integration `rule`."""
    start = time.perf_counter()
    device = torch.device(cfg.device)
    model = attach_lora(base, cfg.model, seed).to(device)
    method = build_method(model, rule, cfg)
    pl = method.pl
    gen = torch.Generator().manual_seed(10_000 + seed)  # same batches for every rule of this seed
    text0, image0 = evaluate(model, eval_set, device)
    eval_steps, ev_text, ev_image, records = [0], [text0], [image0], []
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = sample_batch(world, cfg.batch_size, gen).to(device)
        logits = model(**batch.model_inputs()).logits
        loss_text, loss_image = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask)
        report = pl.backward(text=loss_text, image=loss_image)
        method.step(lambda: model(**batch.model_inputs()).logits, logits, None)  # CoMMIT: drift over all positions
        method.optimizer.zero_grad()
        if method.commit is not None:
            report.add_metrics(method.commit.metrics())
        records.append({"step": step, **report.to_record()})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            t, i = evaluate(model, eval_set, device)
            eval_steps.append(step)
            ev_text.append(t)
            ev_image.append(i)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(text=f"{records[-1]['loss_text']:.2f}", image=f"{records[-1]['loss_image']:.2f}")
    return RunResult(rule, seed, eval_steps, ev_text, ev_image, records, time.perf_counter() - start)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def run_experiment(cfg: DemoConfig, progress: bool = True) -> dict:
    """Every (seed, rule) run of `cfg`; returns the raw results and timings (see report.py)."""
    cfg.check()
    if cfg.threads is not None and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    vocab = cfg.vocab
    pre_world = make_world(cfg.pretrain_world_seed, vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    ft_world = make_world(cfg.finetune_world_seed, vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    seq_len = sample_batch(ft_world, 1, torch.Generator().manual_seed(0)).input_ids.shape[1]
    runs: list[RunResult] = []
    base_eval: dict[int, dict[str, float]] = {}
    timings = {"pretrain_s": 0.0, "finetune_s": 0.0}
    from tqdm.auto import tqdm

    for seed in cfg.seeds:
        t0 = time.perf_counter()
        base = build_base_model(cfg.model, vocab.size, seq_len, seed)
        with _bar(cfg.pretrain_steps, f"seed {seed} pre-train (full model)", progress) as bar:
            pretrain(base, pre_world, cfg.pretrain_steps, cfg.batch_size, cfg.pretrain_lr, seed, cfg.device, bar)
        timings["pretrain_s"] += time.perf_counter() - t0
        eval_set = fixed_batches(ft_world, cfg.eval_batches, cfg.eval_batch_size, seed=20_000 + seed)
        pre_eval = fixed_batches(pre_world, cfg.eval_batches, cfg.eval_batch_size, seed=30_000 + seed)
        pt, pi = evaluate(base, pre_eval, torch.device(cfg.device))
        base_eval[seed] = {"pretrain_world_text": pt, "pretrain_world_image": pi}
        for rule in cfg.rules:
            with _bar(cfg.steps, f"seed {seed} {rule:>12}", progress) as bar:
                run = finetune(base, cfg, rule, seed, ft_world, eval_set, bar)
            runs.append(run)
            timings["finetune_s"] += run.seconds
            if progress:
                tqdm.write(f"  seed {seed} {rule:>12}: held-out text {run.final_text:.3f}  image {run.final_image:.3f}"
                           f"  ({run.seconds:.1f}s)")
    return {"config": cfg, "vocab": vocab, "seq_len": seq_len, "runs": runs, "base_eval": base_eval, "timings": timings}
