"""The demo experiment: pre-train a tiny base model, then LoRA-fine-tune it once per rule and seed.

Within one seed every rule starts from the same pre-trained base, the same LoRA initialisation
and sees the same batches in the same order, so the rules differ only in how the text and image
gradients are combined. The gradients go through :class:`pareto_lora.ParetoLoRA` exactly as in
a user's training loop; rule ``"sum"`` is vanilla LoRA (g_text + g_image everywhere).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time

import torch

import pareto_lora
from pareto_lora import args

from pareto_lora.flat.layout import split_layers

from .base import BaseSpec, default_cache_dir, pretrained_base
from .data import Vocab, World, fixed_batches, make_world, sample_batch
from .evaluation import evaluate
from .floors import entropy_floors
from .methods import ALL_METHODS, OPTIMIZERS, PLAIN_BACKWARDS, build_method, loss_weights, takes_one_backward
from .model import ARCHS, ModelConfig, attach_lora, logits_of
from .output import load_json, save_json
from .parallel import run_cells

__all__ = ["DemoConfig", "RunResult", "Setup", "evaluate", "finetune", "prepare", "run_cell", "run_experiment"]


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    rules: tuple[str, ...] = ALL_METHODS  # rules, balancers, controls and loss weights (methods.py)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 80
    batch_size: int = 32
    lr: float = 1e-2  # tuned once for vanilla (sum, seed 0, 80 steps) over 1e-3, 3e-3, 1e-2, 3e-2
    pretrain_steps: int = 600  # at most; stops once the base solves its own world's images
    pretrain_lr: float = 3e-3
    pretrain_target_acc: float = 0.95
    base_seed: int = 0  # one base for every fine-tuning seed, as a practitioner fine-tunes one base
    # True: fine-tuning seed s starts from a base pre-trained with seed s (base_seed unused), so the
    # seed-to-seed spread contains pre-training too; each base is cached under its own key
    base_per_seed: bool = False
    cache_dir: str | None = "default"  # "default" = base.default_cache_dir(); None = no cache
    pretrain: bool = False  # True: pre-train the base in this process even where the package ships it (base.py)
    eval_every: int = 20
    eval_batches: int = 2
    eval_batch_size: int = 64
    tau: float = 0.5
    num_groups: int = 3
    modulate: str = "lower"
    optimizer: str = "adamw"  # "adamw" (the main study) or "sgd" (plain SGD: no momentum, no weight decay)
    plain_backward: str = "two"  # the plain runs' (vanilla, curve, brackets) backwards: methods.PLAIN_BACKWARDS
    pretrain_world_seed: int = 1
    finetune_world_seed: int = 2
    image_noise: float = 0.15
    num_templates: int = 8
    device: str = "cpu"
    # Intra-op threads on CPU. The model is tiny, so a second thread gains ~1.4x when the cores are
    # idle but stalls for seconds per step when another process holds a core: 1 is the robust default.
    threads: int | None = 1
    # Worker processes for the fine-tuning runs (app/demo/parallel.py): None = one per usable CPU
    # when the base is cached on disk, 1 = serial in this process. The runs' numbers do not change.
    workers: int | None = None
    model: ModelConfig = ModelConfig()
    vocab: Vocab = Vocab()

    def check(self) -> None:
        """ValueError naming the field for values the experiment cannot run with."""
        bad = [r for r in self.rules if r not in ALL_METHODS]
        if bad or not self.rules:
            raise ValueError(f"rules: unknown rule(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                             f"expected names from {', '.join(ALL_METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: expected an integer >= 1 or None, got {self.threads}")
        args.integer("workers", self.workers, 1, none=True)  # not a bool, a str or a float
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps: expected an integer >= 0, got {self.pretrain_steps}")
        for name in ("lr", "pretrain_lr", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)}")
        if not 0 < self.pretrain_target_acc <= 1:
            raise ValueError(f"pretrain_target_acc: expected a fraction in (0, 1], got {self.pretrain_target_acc}")
        args.flag("pretrain", self.pretrain)
        args.choice("plain_backward", self.plain_backward, PLAIN_BACKWARDS)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.model.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {', '.join(ARCHS)}, got {self.model.arch!r}")
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
    eval_text_excess: list[float] = dataclasses.field(default_factory=list)  # loss - exact floor
    eval_image_excess: list[float] = dataclasses.field(default_factory=list)
    eval_acc: list[float] = dataclasses.field(default_factory=list)  # image cell accuracy
    group_layers: list[list[int]] = dataclasses.field(default_factory=list)  # layers of each layer group
    optimizer: str | None = None  # None: a run saved before the field existed (AdamW)
    lr: float | None = None
    optimizer_warning: str | None = None  # pareto_lora's check_optimizer message, if it warned
    diverged_step: int | None = None  # the step whose losses were not finite (the run stopped there)

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None or not all(math.isfinite(v) for v in self.final.values())

    @property
    def final(self) -> dict[str, float]:
        return {"text_excess": self.eval_text_excess[-1], "image_excess": self.eval_image_excess[-1],
                "cell_acc": self.eval_acc[-1], "text": self.eval_text[-1], "image": self.eval_image[-1]}

    @property
    def final_text(self) -> float:
        return self.eval_text[-1]

    @property
    def final_image(self) -> float:
        return self.eval_image[-1]


_EVALS = (("eval_text", "text"), ("eval_image", "image"), ("eval_text_excess", "text_excess"),
          ("eval_image_excess", "image_excess"), ("eval_acc", "cell_acc"))


def first_eval(run: RunResult) -> dict:
    """The step-0 evaluation of `run` (the base with LoRA's B = 0: the same for every method of a seed)."""
    return {key: getattr(run, name)[0] for name, key in _EVALS}


def finetune(base, cfg: DemoConfig, rule: str, seed: int, world: World, eval_set, floors, progress=None,
             step0: dict | None = None) -> RunResult:
    """LoRA fine-tuning of a copy of `base` on `world` with gradient integration `rule`.

    `step0`: the step-0 evaluation of an earlier run of this seed, base and held-out set (first_eval),
    reused: before any step, LoRA adds exact zeros (B = 0), so every method evaluates the same model.
    """
    start = time.perf_counter()
    device = torch.device(cfg.device)
    model = attach_lora(base, cfg.model, seed).to(device)
    method = build_method(model, rule, cfg)
    pl = method.pl
    w_text, w_image = loss_weights(rule)
    gen = torch.Generator().manual_seed(10_000 + seed)  # same batches for every rule of this seed
    run = RunResult(rule, seed, [], [], [], [], 0.0, group_layers=[list(g) for g in pl.layout.group_layers],
                    optimizer=cfg.optimizer, lr=cfg.lr, optimizer_warning=method.warning)

    def record_eval(step: int, ev: dict | None = None) -> None:
        ev = ev or evaluate(model, eval_set, device, world, floors)
        run.eval_steps.append(step)
        for name, key in _EVALS:
            getattr(run, name).append(ev[key])

    record_eval(0, step0)
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = sample_batch(world, cfg.batch_size, gen).to(device)
        logits = logits_of(model, batch.model_inputs())
        loss_text, loss_image = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask)
        # controls and loss weights scale the objectives; every rule sees them unscaled (1, 1)
        try:
            report = pl.backward(text=w_text * loss_text, image=w_image * loss_image)
        except FloatingPointError:  # diverged (a learning rate too large for SGD): ParetoLoRA refuses to step
            run.diverged_step = step
            record_eval(step)
            break
        method.step(lambda: logits_of(model, batch.model_inputs()), logits, None)  # CoMMIT: drift over all positions
        method.optimizer.zero_grad()
        if method.commit is not None:
            report.add_metrics(method.commit.metrics())
        run.records.append({"step": step, **report.to_record()})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            record_eval(step)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(text=f"{float(loss_text.detach()):.2f}", image=f"{float(loss_image.detach()):.2f}")
    run.seconds = time.perf_counter() - start
    return run


def config_key(cfg: DemoConfig) -> str:
    """Hash of everything a run's numbers depend on except the rule and seed (names run files).

    Options added after the first study are left out at their defaults (AdamW, the Llama, one
    shared base, two backwards for the plain runs, the shipped or cached base), so the run files of
    earlier studies keep their names and still resume. With
    ``base_per_seed`` the key differs from the shared-base key (and no longer depends on
    ``base_seed``), so the two settings never load each other's runs.
    """
    d = dataclasses.asdict(cfg)
    for k in ("rules", "seeds", "threads", "workers", "cache_dir"):
        d.pop(k)
    if d["base_per_seed"]:
        d.pop("base_seed")
    else:
        d.pop("base_per_seed")
    if d["optimizer"] == "adamw":
        d.pop("optimizer")
    for k, default in (("plain_backward", "two"), ("pretrain", False)):
        if d[k] == default:
            d.pop(k)
    if d["model"]["arch"] == "llama":
        d["model"].pop("arch")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _load_run(path: str, cfg: DemoConfig) -> RunResult | None:
    try:
        run = RunResult(**load_json(path))
    except (OSError, ValueError, TypeError):
        return None  # missing or from an older layout: run it again
    if not run.group_layers and run.records:  # saved before the field existed: the layout's split
        ranges = split_layers(cfg.model.num_layers, cfg.num_groups)
        run.group_layers = [list(ranges[int(g[5:])]) if g[5:].isdigit() else [] for g in run.records[0]["groups"]]
    if run.optimizer is None:
        run.optimizer, run.lr = cfg.optimizer, cfg.lr
    return run


def _save_run(run: RunResult, path: str) -> None:
    save_json(dataclasses.asdict(run), path)  # strict JSON: null for a non-finite number


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


@dataclasses.dataclass
class Setup:
    """What every run of one study shares: the worlds' floors, the pre-trained base(s), the timings.

    ``base`` / ``base_info``: the shared base; with ``cfg.base_per_seed`` the base of the first
    seed, and ``base_info`` holds ``per_seed`` (seed -> that base's info). :meth:`base_for` gives
    the base a fine-tuning seed starts from (pre-training, or loading, a missing one on demand).
    """

    cfg: DemoConfig
    ft_world: World
    floors: object  # floors.Floors
    seq_len: int
    base: torch.nn.Module
    base_info: dict
    timings: dict  # pretrain_s, finetune_s (runs made by this process), runs_loaded
    bases: dict = dataclasses.field(default_factory=dict)  # seed -> base (base_per_seed only)
    step0: dict = dataclasses.field(default_factory=dict)  # (seed, held-out set) -> step-0 evaluation
    pre_world: World | None = None
    progress: bool = False

    def base_for(self, seed: int) -> torch.nn.Module:
        """The base fine-tuning seed `seed` starts from."""
        if not self.cfg.base_per_seed:
            return self.base
        if seed not in self.bases:
            self.bases[seed], info = _load_base(self.cfg, seed, self.pre_world, self.ft_world, self.floors,
                                                self.seq_len, self.progress)
            self.base_info["per_seed"][seed] = info
            self.timings["pretrain_s"] += info["seconds"]
            self.base_info["cached"] = all(i["cached"] for i in self.base_info["per_seed"].values())
        return self.bases[seed]

    def result(self, runs: list[RunResult], cfg: DemoConfig | None = None) -> dict:
        """The raw results of `runs` in report.py's layout."""
        return {"config": cfg or self.cfg, "vocab": self.cfg.vocab, "seq_len": self.seq_len, "runs": runs,
                "floors": dataclasses.asdict(self.floors), "base": self.base_info, "timings": self.timings}


def prepare(cfg: DemoConfig, progress: bool = True) -> Setup:
    """Threads, worlds, exact floors and the pre-trained base(s) (from the cache when present)."""
    cfg.check()
    if cfg.threads is not None and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    vocab = cfg.vocab
    pre_world = make_world(cfg.pretrain_world_seed, vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    ft_world = make_world(cfg.finetune_world_seed, vocab, noise=cfg.image_noise, num_templates=cfg.num_templates)
    floors = entropy_floors(ft_world)
    seq_len = sample_batch(ft_world, 1, torch.Generator().manual_seed(0)).input_ids.shape[1]
    timings = {"pretrain_s": 0.0, "finetune_s": 0.0, "runs_loaded": 0}
    if not cfg.base_per_seed:
        base, base_info = _load_base(cfg, cfg.base_seed, pre_world, ft_world, floors, seq_len, progress)
        timings["pretrain_s"] = base_info["seconds"]
        return Setup(cfg, ft_world, floors, seq_len, base, base_info, timings, pre_world=pre_world, progress=progress)
    setup = Setup(cfg, ft_world, floors, seq_len, None, {"per_seed": {}}, timings, pre_world=pre_world, progress=progress)
    for seed in cfg.seeds:  # one base per fine-tuning seed, each with its own progress bar and cache key
        setup.base_for(seed)
    setup.base = setup.bases[cfg.seeds[0]]
    return setup


def _load_base(cfg: DemoConfig, seed: int, pre_world: World, ft_world: World, floors, seq_len: int, progress: bool):
    """(base pre-trained with `seed`, its info incl. its evaluation on the fine-tuning world), from the cache when present."""
    device = torch.device(cfg.device)
    spec = BaseSpec(cfg.model, cfg.vocab.size, seq_len, seed, cfg.pretrain_steps, cfg.pretrain_lr,
                    cfg.batch_size, cfg.pretrain_target_acc)
    cache = default_cache_dir() if cfg.cache_dir == "default" else cfg.cache_dir
    with _bar(cfg.pretrain_steps, f"{cfg.model.arch} base (seed {seed}) pre-train until it solves its images",
              progress) as bar:
        base, base_info = pretrained_base(spec, pre_world, device, cache, bar, pretrain=cfg.pretrain)
    base_info["finetune_world_before"] = evaluate(base, fixed_batches(ft_world, cfg.eval_batches, cfg.eval_batch_size, 29_999),
                                                  device, ft_world, floors)
    if progress:
        from tqdm.auto import tqdm

        own = base_info["own_world"]
        how = " (shipped with the package)" if base_info.get("shipped") else " (cached)" if base_info["cached"] else ""
        tqdm.write(f"base (seed {seed}): {base_info['steps']} pre-training steps{how}; "
                   f"on its own world image excess {own['image_excess']:.3f} nats, cell accuracy {own['cell_acc']:.1%}")
    return base, base_info


def run_cell(setup: Setup, cfg: DemoConfig, rule: str, seed: int, runs_dir: str | None = None, progress: bool = True,
             eval_seed: int | None = None) -> RunResult:
    """One (rule, seed) run under `cfg` (same model and worlds as ``setup.cfg``; the optimizer and
    learning rate may differ), loaded from `runs_dir` when it was made before.

    Held-out batches: seed ``20_000 + seed`` (``eval_seed`` overrides it: a validation set).
    """
    path = None
    if runs_dir:
        os.makedirs(runs_dir, exist_ok=True)
        path = os.path.join(runs_dir, f"{config_key(cfg)}-{rule}-seed{seed}.json")
    run = _load_run(path, cfg) if path and os.path.isfile(path) else None
    if run is None:
        key = (seed, 20_000 + seed if eval_seed is None else eval_seed, cfg.eval_batches, cfg.eval_batch_size)
        eval_set = fixed_batches(setup.ft_world, cfg.eval_batches, cfg.eval_batch_size, seed=key[1])
        with _bar(cfg.steps, f"seed {seed} {rule:>12}", progress) as bar:
            run = finetune(setup.base_for(seed), cfg, rule, seed, setup.ft_world, eval_set, setup.floors, bar,
                           step0=setup.step0.get(key))
        setup.step0.setdefault(key, first_eval(run))
        if path:
            _save_run(run, path)
        setup.timings["finetune_s"] += run.seconds
    else:
        setup.timings["runs_loaded"] += 1
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(cell_line(run, cfg))
    return run


def cell_line(run: RunResult, cfg: DemoConfig) -> str:
    """The progress line of one finished run."""
    f = run.final
    lr = f" lr {cfg.lr:g}" if cfg.optimizer != "adamw" else ""
    return (f"  seed {run.seed} {run.rule:>12}{lr}: excess text {f['text_excess']:.3f} image {f['image_excess']:.3f}"
            f"  cell acc {f['cell_acc']:.1%}  ({run.seconds:.1f}s)")


def run_experiment(cfg: DemoConfig, progress: bool = True, runs_dir: str | None = None) -> dict:
    """Every (seed, rule) run of `cfg`; returns the raw results and timings (see report.py).

    `runs_dir`: one JSON file per finished run; a run whose file exists (same config) is loaded,
    not rerun, so an interrupted study resumes where it stopped. The runs go to ``cfg.workers``
    processes (parallel.py); the results are the same as a serial study's.
    """
    setup = prepare(cfg, progress)
    cells = [(rule, seed) for seed in cfg.seeds for rule in cfg.rules]
    echo = None
    if progress:
        from tqdm.auto import tqdm

        echo = tqdm.write
    runs = run_cells(setup, prepare, run_cell, cfg, cells, runs_dir, cell_kwargs=dict(progress=progress),
                     quiet_kwargs=dict(progress=False), prepare_kwargs=dict(progress=False), echo=echo,
                     line=lambda run: cell_line(run, cfg), cost=lambda rule: _run_cost(rule, cfg))
    return setup.result(runs)


def _run_cost(rule: str, cfg: DemoConfig) -> float:
    """A run's time relative to a two-pass run: a plain run in one backward is F + B against F + 2B,
    0.69-0.73 of it on the demo's model (bench/bench_demo_runs.py, docs/study.md)."""
    return 0.7 if takes_one_backward(rule, cfg) else 1.0
