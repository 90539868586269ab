"""The pre-trained base model of the demo: trained until it knows its own world, cached on disk.

A base that has not learned the image format makes every fine-tuning rule look alike (all end at
"predict each cell's code frequency"), so pre-training runs until the base solves the images of
its pre-training world (image cell accuracy >= ``target_acc``, checked every ``check_every``
steps) or ``max_steps``. The weights are cached under ``cache_dir`` keyed by a hash of
everything that determines them, so a second run (or the full study after the demo) skips it.

The default demo's base also ships with the package (``bases/``, :data:`SHIPPED_TORCH`): pre-training
it took 107 s of the 935 s a first demo took on a 2 GHz Zen 1 (issue 25), and MKL picks its kernels by
CPU vendor, so a base pre-trained on an Intel CPU differs from one pre-trained on an AMD CPU
(docs/study.md). With the shipped one every machine fine-tunes the same base. It is looked up by the
same key as the cache, computed with the torch version it was pre-trained under; ``pretrain=True``
(``pareto-lora demo --pretrain``) pre-trains in this process instead, as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import torch

from .data import World, fixed_batches, sample_batch
from .evaluation import evaluate
from .floors import entropy_floors
from .model import ModelConfig, build_base_model, logits_of, token_losses

__all__ = ["BaseSpec", "SHIPPED_TORCH", "default_cache_dir", "shipped_path", "pretrained_base"]

#: the torch version the shipped bases were pre-trained under (part of their key)
SHIPPED_TORCH = "2.13.0+cpu"
_SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bases")


@dataclasses.dataclass(frozen=True)
class BaseSpec:
    model: ModelConfig
    vocab_size: int
    seq_len: int
    seed: int
    max_steps: int
    lr: float
    batch_size: int
    target_acc: float = 0.95
    check_every: int = 50

    def key(self, world: World, torch_version: str = torch.__version__) -> str:
        """Hash of the spec, the world (its masks/palettes/templates decide the weights too) and the
        torch version that pre-trains it."""
        w = (world.caption_templates, world.change_templates, world.verb_shift, world.shape_masks.tolist(),
             world.palette.tolist(), world.noise, dataclasses.asdict(world.vocab))
        spec = dataclasses.asdict(self)
        if spec["model"]["arch"] == "llama":  # the field came later: the Llama's cached bases keep their key
            spec["model"].pop("arch")
        blob = json.dumps([spec, w, torch_version], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    """$PARETO_LORA_CACHE, else ~/.cache/pareto_lora/bases."""
    return os.environ.get("PARETO_LORA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pareto_lora", "bases")


def shipped_path(spec: BaseSpec, world: World) -> str | None:
    """The shipped base of `spec` on `world`, or None when the package ships none for it."""
    path = os.path.join(_SHIPPED_DIR, f"base-{spec.key(world, SHIPPED_TORCH)}.pt")
    return path if os.path.isfile(path) else None


def _load(model, path: str, device, **info):
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state"])
    model.to(device).eval()
    return model, {**saved["info"], "cached": True, "seconds": 0.0, **info}


def pretrained_base(spec: BaseSpec, world: World, device, cache_dir: str | None, progress=None, pretrain: bool = False):
    """(frozen base model, info) -- the shipped base when the package has one for `spec` (unless
    `pretrain`), else loaded from the cache when present, else trained and stored there.

    info: steps trained, seconds, cached flag (True when nothing was trained), shipped flag, and
    the base's evaluation on its own world.
    """
    model = build_base_model(spec.model, spec.vocab_size, spec.seq_len, spec.seed, vocab=world.vocab)
    shipped = None if pretrain else shipped_path(spec, world)
    if shipped:
        return _load(model, shipped, device, shipped=True)
    path = os.path.join(cache_dir, f"base-{spec.key(world)}.pt") if cache_dir else None
    floors = entropy_floors(world)
    held_out = fixed_batches(world, 2, 64, seed=30_000 + spec.seed)
    if path and os.path.isfile(path):
        return _load(model, path, device, shipped=False)
    t0 = time.perf_counter()
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(spec.seed)
    step, own = 0, None
    while step < spec.max_steps:
        batch = sample_batch(world, spec.batch_size, gen).to(device)
        per_tok = token_losses(logits_of(model, batch.model_inputs()), batch.labels)
        (per_tok.sum() / (batch.labels[:, 1:] != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if progress is not None:
            progress.update(1)
        if step % spec.check_every == 0 or step == spec.max_steps:
            own = evaluate(model, held_out, device, world, floors)
            if progress is not None:
                progress.set_postfix(img_excess=f"{own['image_excess']:.2f}", cell_acc=f"{own['cell_acc']:.2f}")
            if own["cell_acc"] >= spec.target_acc:
                break
    model.eval()
    info = {"steps": step, "own_world": own, "seconds": time.perf_counter() - t0}
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"  # atomic: a killed run never leaves a half-written base
        torch.save({"state": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)
    return model, {**info, "cached": False, "shipped": False}
