"""The digits world's experiment: tokenizer, base, then one LoRA fine-tuning run per method and seed.

``prepare`` splits the digits, trains the VQ codebook on the training split, trains the classifier
that scores generated digits, builds the two worlds and pre-trains (or loads) the base. ``finetune``
is one LoRA run through :class:`pareto_lora.ParetoLoRA` exactly as in the shapes world
(methods.build_method: the same rules, balancers, options and loss-weight curve); every method of a
seed gets the same LoRA init, the same batches and the same sampling draws at evaluation.
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

from ..experiment import DemoConfig
from ..methods import ALL_METHODS, build_method, loss_weights
from ..model import ModelConfig, attach_lora, build_base_model, logits_of
from .data import DigitsVocab, TokenSplit, eval_batches, make_world, sample_batch
from .metrics import classifier_accuracy, evaluate_losses, generation_accuracy, train_classifier
from .tokens import split_digits, train_codebook

__all__ = ["DigitsConfig", "DigitsRun", "Setup", "prepare", "finetune", "run_cell", "cached_run", "run_path", "LONG",
           "LOSS_NORMS"]

LONG = "image_only_long"  # the long image-only reference run (steps x long_factor)
LOSS_NORMS = ("modality", "token")


@dataclasses.dataclass(frozen=True)
class DigitsConfig:
    rules: tuple[str, ...] = ("text_only", "image_only", "sum", "w2", "w4", "pareto_lora")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 50
    batch_size: int = 32
    lr: float = 1e-2  # the study replaces it by the rate tuned for vanilla (study.py)
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    pretrain_digits: tuple[int, ...] = (0, 1, 2, 3, 4, 5)  # the base never sees 6..9
    pretrain_world_seed: int = 1
    finetune_world_seed: int = 2
    split_seed: int = 0
    codebook_size: int = 32
    patch: int = 2
    # "modality": each objective is the mean over its own targets; "token": both are divided by
    # the number of all targets (the share a single causal-LM loss gives each modality)
    loss_norm: str = "modality"
    # the image objective enters multiplied by this (metrics stay unscaled): < 1 puts the image loss on
    # a smaller scale than the text's, as an image loss of another kind (Emu2's embedding regression) is
    image_scale: float = 1.0
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # tuned for vanilla on tune_seed (empty: use lr)
    tune_seed: int = 100
    gen_samples: int = 4  # temperature draws per (digit, caption template)
    temperature: float = 1.0
    long_factor: int = 3  # the long image-only reference runs steps x long_factor
    tau: float = 0.5
    num_groups: int = 3
    modulate: str = "lower"
    optimizer: str = "adamw"
    cache_dir: str | None = "default"
    device: str = "cpu"
    threads: int | None = 1
    workers: int | None = None  # processes for the runs (app/demo/parallel.py); None: one per CPU if cached
    model: ModelConfig = ModelConfig(num_layers=4)  # 3 groups: layers 0-1, 2, 3

    @property
    def vocab(self) -> DigitsVocab:
        return DigitsVocab(num_codes=self.codebook_size, grid=8 // self.patch)

    def check(self) -> None:
        bad = [r for r in self.rules if r not in ALL_METHODS and r != LONG]
        if bad or not self.rules:
            raise ValueError(f"rules: unknown rule(s) {', '.join(map(repr, bad)) or '(none given)'}; "
                             f"expected names from {', '.join(ALL_METHODS)}, {LONG}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: expected distinct seeds, got {list(self.seeds)}")
        for name in ("steps", "pretrain_steps", "gen_samples", "long_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"batch_size: expected an even integer >= 2, got {self.batch_size}")
        for name in ("lr", "pretrain_lr", "tau", "temperature", "image_scale", *(() if not self.lrs else ("lrs",))):
            vals = getattr(self, name) if name == "lrs" else (getattr(self, name),)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and math.isfinite(x) for x in vals):
                raise ValueError(f"{name}: expected a finite number > 0, got {getattr(self, name)}")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm: expected one of {', '.join(LOSS_NORMS)}, got {self.loss_norm!r}")
        if self.model.arch != "llama":
            raise ValueError(f"arch: the digits world runs the Llama only (KV-cached sampling), got {self.model.arch!r}")
        if not set(self.pretrain_digits) < set(range(10)) or not self.pretrain_digits:
            raise ValueError(f"pretrain_digits: expected a non-empty proper subset of 0..9, got {self.pretrain_digits!r}")
        if not 1 <= self.num_groups <= self.model.num_layers:
            raise ValueError(f"num_groups: expected 1..{self.model.num_layers} (the model's layers), got {self.num_groups}")
        DemoConfig(rules=("sum",), optimizer=self.optimizer, model=self.model, workers=self.workers).check()

    def key(self) -> str:
        """Hash of everything a run's numbers depend on except the method, seed, lr and steps."""
        d = dataclasses.asdict(self)
        for k in ("rules", "seeds", "lr", "lrs", "tune_seed", "steps", "cache_dir", "threads", "workers", "device"):
            d.pop(k)
        return hashlib.sha256(json.dumps([d, torch.__version__], sort_keys=True).encode()).hexdigest()[:12]


@dataclasses.dataclass
class DigitsRun:
    """One (method, seed) fine-tuning run: final held-out metrics and the per-step gradient records."""

    rule: str
    seed: int
    lr: float
    steps: int
    final: dict  # text, image (held-out loss), und_acc, gen_acc_greedy, gen_acc_sampled
    records: list[dict]
    seconds: float
    group_layers: list[list[int]]
    greedy_images: list = dataclasses.field(default_factory=list)  # [10][8][8]: each digit, first template
    sampled_images: list = dataclasses.field(default_factory=list)
    diverged_step: int | None = None

    @property
    def diverged(self) -> bool:
        return self.diverged_step is not None or not all(math.isfinite(v) for v in self.final.values())


@dataclasses.dataclass
class Setup:
    cfg: DigitsConfig
    splits: dict
    codebook: object
    classifier: object
    tokens: dict  # split name -> TokenSplit
    pre_world: object
    ft_world: object
    base: torch.nn.Module
    base_info: dict
    timings: dict


def _objectives(logits, batch, loss_norm: str, image_scale: float = 1.0):
    """(text objective, image objective) of a training batch."""
    n = None
    if loss_norm == "token":
        n = sum(pareto_lora.modality_token_counts(batch.labels, image_token_mask=batch.image_token_mask))
    lt, li = pareto_lora.modality_losses(logits, batch.labels, image_token_mask=batch.image_token_mask,
                                         num_items=None if n is None else (n, n))
    return lt, li * image_scale if image_scale != 1.0 else li


def _evaluate(model, cfg: DigitsConfig, setup: "Setup", world, split: str, seed: int) -> dict:
    """Held-out losses and understanding accuracy on `split`, generation accuracy on `world`'s captions."""
    device = torch.device(cfg.device)
    ev = evaluate_losses(model, eval_batches(world, setup.tokens[split], 20_000 + seed), device, world.vocab)
    gen = generation_accuracy(model, world, setup.codebook, setup.classifier, device, seed, cfg.gen_samples,
                              cfg.temperature)
    return {**ev, **gen}


def _pretrain(cfg: DigitsConfig, setup: Setup, progress) -> tuple[torch.nn.Module, dict]:
    v = cfg.vocab
    model = build_base_model(cfg.model, v.size, v.seq_len, seed=0)
    cache = None
    if cfg.cache_dir is not None:
        from ..base import default_cache_dir

        cache = default_cache_dir() if cfg.cache_dir == "default" else cfg.cache_dir
    # what decides the base's weights (not the fine-tuning fields: both settings share one base)
    fields = ("model", "batch_size", "pretrain_steps", "pretrain_lr", "pretrain_digits", "pretrain_world_seed",
              "split_seed", "codebook_size", "patch")
    spec = {k: dataclasses.asdict(cfg)[k] for k in fields}
    blob = json.dumps([spec, setup.codebook.digest(), torch.__version__], sort_keys=True)
    path = os.path.join(cache, f"digits-base-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.pt") if cache else None
    if path and os.path.isfile(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["state"])
        return model.to(cfg.device).eval(), {**saved["info"], "cached": True, "seconds": 0.0}
    t0 = time.perf_counter()
    model.to(cfg.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(cfg.pretrain_steps):
        batch = sample_batch(setup.pre_world, setup.tokens["train"], cfg.batch_size, gen).to(cfg.device)
        lt, li = _objectives(logits_of(model, batch.model_inputs()), batch, "modality")
        (lt + li).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(1)
    model.eval()
    info = {"steps": cfg.pretrain_steps, "seconds": time.perf_counter() - t0}
    if path:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save({"state": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
    return model, {**info, "cached": False}


def prepare(cfg: DigitsConfig, progress=None) -> Setup:
    """Split, codebook, classifier, worlds and the pre-trained base (from the cache when present)."""
    cfg.check()
    if cfg.threads is not None and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    splits = split_digits(cfg.split_seed)
    codebook = train_codebook(splits["train"].images, cfg.codebook_size, cfg.patch, seed=cfg.split_seed)
    classifier = train_classifier(splits["train"])
    tokens = {k: TokenSplit.of(codebook, s) for k, s in splits.items()}
    v = cfg.vocab
    pre_world = make_world(cfg.pretrain_world_seed, v, cfg.pretrain_digits)
    ft_world = make_world(cfg.finetune_world_seed, v)
    test = splits["test"]
    clf = {"real_test_acc": classifier_accuracy(classifier, test.images, test.labels),
           "vq_test_acc": classifier_accuracy(classifier, codebook.decode(codebook.encode(test.images)), test.labels)}
    setup = Setup(cfg, splits, codebook, classifier, tokens, pre_world, ft_world, None, {"classifier": clf},
                  {"pretrain_s": 0.0, "finetune_s": 0.0, "runs_loaded": 0})
    base, info = _pretrain(cfg, setup, progress)
    setup.base = base
    setup.timings["pretrain_s"] = info["seconds"]
    info["own_world_val"] = _strip(_evaluate(base, cfg, setup, pre_world, "val", 0))
    info["finetune_world_test"] = _strip(_evaluate(base, cfg, setup, ft_world, "test", 0))
    setup.base_info.update(info)
    return setup


def _strip(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if not k.endswith("_images")}


def finetune(setup: Setup, cfg: DigitsConfig, rule: str, seed: int, split: str = "test") -> DigitsRun:
    """LoRA fine-tuning of a copy of the base on the fine-tuning world with method `rule`; metrics on `split`."""
    start = time.perf_counter()
    device = torch.device(cfg.device)
    steps = cfg.steps * (cfg.long_factor if rule == LONG else 1)
    name = "image_only" if rule == LONG else rule
    model = attach_lora(setup.base, cfg.model, seed).to(device)
    method = build_method(model, name, cfg)
    w_text, w_image = loss_weights(name)
    gen = torch.Generator().manual_seed(10_000 + seed)  # the same batches for every method of this seed
    run = DigitsRun(rule, seed, cfg.lr, steps, {}, [], 0.0, [list(g) for g in method.pl.layout.group_layers])
    model.train()
    for step in range(1, steps + 1):
        batch = sample_batch(setup.ft_world, setup.tokens["train"], cfg.batch_size, gen).to(device)
        logits = logits_of(model, batch.model_inputs())
        lt, li = _objectives(logits, batch, cfg.loss_norm, cfg.image_scale)
        try:
            report = method.pl.backward(text=w_text * lt, image=w_image * li)
        except FloatingPointError:  # non-finite losses: ParetoLoRA refuses to step
            run.diverged_step = step
            break
        method.step(lambda: logits_of(model, batch.model_inputs()), logits, None)
        method.optimizer.zero_grad()
        if method.commit is not None:
            report.add_metrics(method.commit.metrics())
        run.records.append({"step": step, **report.to_record()})
    ev = _evaluate(model, cfg, setup, setup.ft_world, split, seed)
    run.greedy_images, run.sampled_images = ev.pop("greedy_images"), ev.pop("sampled_images")
    run.final = ev
    run.seconds = time.perf_counter() - start
    return run


def _load(path: str) -> DigitsRun | None:
    try:
        with open(path, encoding="utf-8") as f:
            return DigitsRun(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None  # missing or from another layout: run it again


def cached_run(setup: Setup, path: str | None, make) -> DigitsRun:
    """The run stored at `path` when there is one, else ``make()``, stored there (None: not stored);
    ``setup.timings`` counts it (``finetune_s`` or ``runs_loaded``)."""
    run = _load(path) if path and os.path.isfile(path) else None
    if run is None:
        run = make()
        if path:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(dataclasses.asdict(run), f, default=lambda x: None)
            os.replace(tmp, path)
        setup.timings["finetune_s"] += run.seconds
    else:
        setup.timings["runs_loaded"] += 1
    return run


def run_path(runs_dir: str | None, cfg: DigitsConfig, split: str, rule: str, seed: int, prefix: str = "") -> str | None:
    """Where the run of (`rule`, `seed`) under `cfg` is stored in `runs_dir` (None: nowhere)."""
    if not runs_dir:
        return None
    os.makedirs(runs_dir, exist_ok=True)
    return os.path.join(runs_dir, f"{prefix}{cfg.key()}-{split}-{rule}-seed{seed}-lr{cfg.lr:g}-steps{cfg.steps}.json")


def run_cell(setup: Setup, cfg: DigitsConfig, rule: str, seed: int, runs_dir: str | None, split: str = "test",
             echo=None) -> DigitsRun:
    """One run, loaded from `runs_dir` when it was made before with the same config, lr and split."""
    run = cached_run(setup, run_path(runs_dir, cfg, split, rule, seed), lambda: finetune(setup, cfg, rule, seed, split))
    if echo is not None:
        echo(cell_line(run, cfg))
    return run


def cell_line(run: DigitsRun, cfg: DigitsConfig) -> str:
    """The progress line of one finished run."""
    f = run.final
    return (f"  seed {run.seed} {run.rule:>16} lr {cfg.lr:g}: text {f['text']:.3f} image {f['image']:.3f} "
            f"und {f['und_acc']:.1%} gen {f['gen_acc_greedy']:.1%}/{f['gen_acc_sampled']:.1%}  ({run.seconds:.1f}s)")
