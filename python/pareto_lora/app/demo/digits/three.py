"""Three objectives in the digits world: text, understanding, generation (docs/study_three.md).

The digits world's batches hold the three kinds of target a unified model trains on at once, as
:mod:`pareto_lora.archs.objectives` splits them for Janus, Chameleon and Emu3:

* ``generation``: every image-code target (exactly the two-objective image loss);
* ``understanding``: the text targets of an understanding sequence that come after its image
  (``<eoi>``, the question, the answer, ``<eos>``): text conditioned on an image input;
* ``text``: every other text target (captions and the markers around them).

Each objective is the mean over its own targets (the digits study's ``loss_norm="modality"``). A
method is a K = 3 rule of :data:`pareto_lora.multi.weightings.K_RULES` on the modulated groups
(``ParetoLoRA(objectives=OBJECTIVES)``), or a point of the plain alternative, the grid of fixed
loss weights ``L_text + w_u L_understanding + w_g L_generation`` (:data:`GRID`; ``sum`` is
(1, 1)), which takes its gradients through the same K = 3 step with rule ``sum``. Every method of
a seed gets the same LoRA init, the same batches and the same sampling draws, as in the
two-objective study (:func:`.experiment.finetune`).
"""

from __future__ import annotations

import time

import torch

import pareto_lora

from ..model import attach_lora, logits_of, token_losses
from .data import eval_batches, sample_batch
from .experiment import DigitsConfig, DigitsRun, Setup, cached_run, run_path
from .metrics import generation_accuracy, understanding_hits

__all__ = ["OBJECTIVES", "RULES", "GRID", "METHODS", "objective_masks", "objective_losses", "finetune3",
           "evaluate3", "run_cell3", "loss_weights3"]

OBJECTIVES = ("text", "understanding", "generation")
#: the K = 3 rules compared (``mean`` is left out: under AdamW it is ``sum`` up to Adam's epsilon,
#: as the two-objective family study measured; ``constant`` is the grid itself)
RULES: tuple[str, ...] = ("mgda", "upgrad", "dualproj", "pcgrad", "imtl_g", "aligned_mtl", "nash_mtl", "config",
                          "cagrad")
_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
#: name -> (understanding weight, generation weight) of the fixed-weight grid; the text weight is 1
GRID: dict[str, tuple[float, float]] = {
    ("sum" if (u, g) == (1.0, 1.0) else f"u{u:g}g{g:g}"): (u, g) for u in _WEIGHTS for g in _WEIGHTS}
METHODS: tuple[str, ...] = (*GRID, *RULES)


def loss_weights3(name: str) -> tuple[float, float, float]:
    """(text, understanding, generation) loss weights of method `name`: (1, 1, 1) for every rule."""
    u, g = GRID.get(name, (1.0, 1.0))
    return 1.0, u, g


def objective_masks(batch, vocab) -> dict[str, torch.Tensor]:
    """name -> bool [B, T-1] over the shifted targets (labels[:, 1:]), disjoint; their union is every target."""
    labels = batch.labels[:, 1:]
    target = labels != -100
    image = batch.image_token_mask[:, 1:] & target
    text = target & ~image
    understanding_row = batch.input_ids[:, 1] == vocab.BOI  # <bos> <boi> image ...: an understanding sequence
    after_image = torch.cumsum(image.long(), 1) > 0  # at or after its first image target: the image was read
    understanding = text & after_image & understanding_row[:, None]
    return {"text": text & ~understanding, "understanding": understanding, "generation": image}


def objective_losses(logits: torch.Tensor, batch, vocab) -> dict[str, torch.Tensor]:
    """name -> mean cross-entropy over that objective's targets (0 when a batch has none)."""
    per_token = token_losses(logits, batch.labels)
    masks = objective_masks(batch, vocab)
    return {k: (per_token * m).sum() / m.sum().clamp_min(1) for k, m in masks.items()}


@torch.no_grad()
def _held_out(model, batches, device, vocab) -> dict[str, float]:
    was_training = model.training
    model.eval()
    sums, counts, right, total = dict.fromkeys(OBJECTIVES, 0.0), dict.fromkeys(OBJECTIVES, 0), 0, 0
    try:
        for batch in batches:
            batch = batch.to(device)
            logits = logits_of(model, batch.model_inputs())
            per_token = token_losses(logits, batch.labels)
            for k, m in objective_masks(batch, vocab).items():
                sums[k] += float((per_token * m).sum())
                counts[k] += int(m.sum())
            h, t = understanding_hits(batch, logits, vocab)
            right, total = right + h, total + t
    finally:
        model.train(was_training)
    losses = {k: sums[k] / max(counts[k], 1) for k in OBJECTIVES}
    return {"text": losses["text"], "understanding": losses["understanding"], "image": losses["generation"],
            "und_acc": right / max(total, 1)}


def evaluate3(model, cfg: DigitsConfig, setup: Setup, world, split: str, seed: int) -> dict:
    """Held-out token-weighted losses of the three objectives (``image`` = generation), understanding
    accuracy and generation accuracy, as the two-objective study measures them."""
    device = torch.device(cfg.device)
    ev = _held_out(model, eval_batches(world, setup.tokens[split], 20_000 + seed), device, world.vocab)
    gen = generation_accuracy(model, world, setup.codebook, setup.classifier, device, seed, cfg.gen_samples,
                              cfg.temperature)
    gen.pop("greedy_images"), gen.pop("sampled_images")
    return {**ev, **gen}


def _build(model, name: str, cfg: DigitsConfig):
    rule = "sum" if name in GRID else name
    pl = pareto_lora.ParetoLoRA(model, rule=pareto_lora.RuleSpec(rule), objectives=OBJECTIVES,
                                num_groups=cfg.num_groups, modulate=cfg.modulate)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    return pl, opt


def finetune3(setup: Setup, cfg: DigitsConfig, name: str, seed: int, split: str = "test") -> DigitsRun:
    """One LoRA run of method `name` (:data:`METHODS`) with the three objectives; metrics on `split`."""
    if name not in METHODS:
        raise ValueError(f"rule: expected one of {', '.join(METHODS)}, got {name!r}")
    start = time.perf_counter()
    device = torch.device(cfg.device)
    model = attach_lora(setup.base, cfg.model, seed).to(device)
    pl, opt = _build(model, name, cfg)
    weights = dict(zip(OBJECTIVES, loss_weights3(name)))
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every method of this seed
    run = DigitsRun(name, seed, cfg.lr, cfg.steps, {}, [], 0.0, [list(g) for g in pl.layout.group_layers])
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = sample_batch(setup.ft_world, setup.tokens["train"], cfg.batch_size, gen).to(device)
        losses = objective_losses(logits_of(model, batch.model_inputs()), batch, setup.ft_world.vocab)
        try:
            report = pl.backward(losses={k: weights[k] * v for k, v in losses.items()})
        except FloatingPointError:  # non-finite losses: ParetoLoRA refuses to step
            run.diverged_step = step
            break
        opt.step()
        opt.zero_grad()
        run.records.append({"step": step, **report.to_record()})
    run.final = evaluate3(model, cfg, setup, setup.ft_world, split, seed)
    run.seconds = time.perf_counter() - start
    return run


def run_cell3(setup: Setup, cfg: DigitsConfig, name: str, seed: int, runs_dir: str | None, split: str = "test",
              echo=None) -> DigitsRun:
    """One run, loaded from `runs_dir` when it was made before with the same config, lr and split."""
    path = run_path(runs_dir, cfg, split, name, seed, prefix="k3-")
    run = cached_run(setup, path, lambda: finetune3(setup, cfg, name, seed, split))
    if echo is not None:
        echo(cell_line3(run))
    return run


def cell_line3(run: DigitsRun) -> str:
    """The progress line of one finished run."""
    f = run.final
    return (f"  seed {run.seed} {run.rule:>12} lr {run.lr:g}: text {f['text']:.3f} und {f['understanding']:.3f} "
            f"gen {f['image']:.3f} und% {f['und_acc']:.1%} gen% {f['gen_acc_greedy']:.1%}/{f['gen_acc_sampled']:.1%}"
            f"  ({run.seconds:.1f}s)")
