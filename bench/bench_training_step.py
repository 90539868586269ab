"""One LoRA training step on CPU: vanilla LoRA vs Pareto LoRA, the FLOP floor, the integration's share.

    python bench/bench_training_step.py                       # every configuration, interleaved, a table
    python bench/bench_training_step.py --configs chameleon --rounds 12
    pytest bench/bench_training_step.py --benchmark-columns=min,median,rounds

Configurations (LoRA r on all linear layers, lora_alpha = 2r, batch 4 x 64 tokens of which 32 per
row are image targets), random weights built from a config, nothing downloaded:
  small      LlamaForCausalLM, 8 layers, hidden 128, r = 16 (vocabulary of 81 ids, image ids among them)
  large      LlamaForCausalLM, 8 layers, hidden 512, r = 32 (same vocabulary)
  chameleon  ChameleonForConditionalGeneration (a real unified multimodal architecture: text and
             image-code tokens in one vocabulary, one LM head), 8 layers, hidden 512,
             intermediate 1024, 4 heads (2 KV), r = 32; vocabulary: 4,096 text ids + 1,024 image
             codes named in config.vocabulary_map as real checkpoints name them (IMGIMG...), the
             <racm3:break> / <eoss> image markers; the image targets come from that map
             (pareto_lora.archs), the losses from archs.modality_losses_for (the unmasked LM head)
             and ParetoLoRA groups by the detected ArchSpec (arch="auto").
Rows (same model, batch and LoRA config):
  forward          the forward pass and both modality losses
  vanilla          forward + (loss_text + loss_image).backward()       (one loss, one backward)
  two_backward     forward + autograd.grad(text) + image.backward()     (Pareto LoRA minus integration)
  pareto_step      forward + ParetoLoRA.backward()                      (the full step)
  integrate_only   the integration on ready buffers (stats -> rule -> combine over all LoRA params)
FLOP floor of the second backward: a backward costs B = vanilla - forward, so two objectives cost
at least forward + 2B; `2nd bwd / B` = (two_backward - vanilla) / B is 1.0 at that floor.

Second table (issue 26, ``--table traversal``): the whole ParetoLoRA step per ``traversal``
(pareto_lora.distributed.traversal) without and with transformers' non-reentrant activation
checkpointing (``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
False})``, toggled on the same model), each as a multiple of vanilla's step in the same mode:
  two_pass, batched             modulate="lower"; auto picks batched under checkpointing
  sum_first lower/middle/upper/all   traversal="sum_first" with that modulate choice
`2nd grad / B` = (step - vanilla) / B, B = vanilla - forward in the same mode (with
checkpointing B includes the recomputed forward). `bitwise` says whether the batched buffers
equal the two-pass ones on this configuration (one step compared before timing).
Numbers only: nothing here asserts a time.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import models  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.flat import flat_step  # noqa: E402

# name: (architecture, layers, hidden, batch, seq, rank)
CONFIGS = {
    "small": ("llama", 8, 128, 4, 64, 16),
    "large": ("llama", 8, 512, 4, 64, 32),
    "chameleon": ("chameleon", 8, 512, 4, 64, 32),
}
ROWS = ("forward", "vanilla", "two_backward", "pareto_step", "integrate_only")

CHAMELEON_TEXT, CHAMELEON_CODES = 4096, 1024  # ids [0, 4096) text (3 = <image>), then the image codes
CHAMELEON_BOI, CHAMELEON_EOI = CHAMELEON_TEXT + CHAMELEON_CODES, CHAMELEON_TEXT + CHAMELEON_CODES + 1


def chameleon_vocabulary_map(text: int = CHAMELEON_TEXT, codes: int = CHAMELEON_CODES) -> dict[str, int]:
    """Token name -> id: text ids (3 = ``<image>``), the image codes named as
    ChameleonImageVocabularyMapping expects (IMGIMG + digits as A..J + Z), then <racm3:break>, <eoss>."""
    vm = {f"<t{i}>": i for i in range(text) if i != 3}
    vm["<image>"] = 3
    for k in range(codes):
        vm["IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(k)) + "Z"] = text + k
    vm["<racm3:break>"], vm["<eoss>"] = text + codes, text + codes + 1
    return vm


def lora_chameleon(num_layers: int, hidden: int, r: int, seed: int = 0):
    """Random ChameleonForConditionalGeneration with PEFT LoRA on all linear layers (lora_B randomised)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    # The VQ tokenizer is frozen and unused on token batches (convolutions only: no LoRA): kept tiny.
    vq = dict(embed_dim=8, num_embeddings=CHAMELEON_CODES, latent_channels=8, base_channels=32,
              channel_multiplier=[1, 2], resolution=8, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(
        vocab_size=CHAMELEON_EOI + 1, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        vocabulary_map=chameleon_vocabulary_map(), vq_config=vq)
    model = transformers.ChameleonForConditionalGeneration(cfg)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT's zero init would make every lora_A gradient zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return peft_model


def chameleon_batch(batch: int, seq: int, seed: int = 0) -> dict:
    """Rows of text, <racm3:break>, 30 image codes, <eoss>, text: 32 image targets per row of 64."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, CHAMELEON_TEXT, (batch, seq), generator=gen)
    ids[:, 16] = CHAMELEON_BOI
    ids[:, 17:47] = torch.randint(CHAMELEON_TEXT, CHAMELEON_TEXT + CHAMELEON_CODES, (batch, 30), generator=gen)
    ids[:, 47] = CHAMELEON_EOI
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def _llama(layers: int, hidden: int, batch_size: int, seq: int, rank: int):
    """(model, losses, ParetoLoRA kwargs) of a LoRA Llama with an image-token span (16, 48)."""
    model = models.lora_llama(num_layers=layers, hidden=hidden, r=rank).train()
    batch = models.token_batch(batch=batch_size, seq=seq, image_span=(16, 48))
    inputs = models.model_inputs(batch)

    def losses():
        out = model(**inputs)
        return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])

    return model, losses, {}


def _chameleon(layers: int, hidden: int, batch_size: int, seq: int, rank: int):
    """(model, losses, ParetoLoRA kwargs) of a LoRA Chameleon; image targets from its vocabulary map."""
    model = lora_chameleon(layers, hidden, rank).train()
    batch = chameleon_batch(batch_size, seq)
    spec = pareto_lora.archs.detect_arch(model)

    def losses():
        return pareto_lora.archs.modality_losses_for(model, batch, spec)

    return model, losses, {"arch": spec}


def build(config: str):
    """(step functions {row name: zero-argument callable}, number of LoRA parameters) of one configuration."""
    arch, *shape = CONFIGS[config]
    model, losses, arch_kwargs = (_llama if arch == "llama" else _chameleon)(*shape)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward():
        with torch.enable_grad():
            losses()

    def vanilla():
        lt, li = losses()
        (lt + li).backward()
        model.zero_grad(set_to_none=True)

    def two_backward():
        lt, li = losses()
        torch.autograd.grad(lt, params, retain_graph=True)
        li.backward()
        model.zero_grad(set_to_none=True)

    pl = pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate="lower", **arch_kwargs)

    def pareto_step():
        pl.backward(*losses())

    pareto_step()
    out = [torch.empty_like(f) for f in pl.image.flats]

    def integrate_only():
        flat_step(pl.text.flats, pl.image.flats, pl.layout, pl._sync.rule, out=out)

    fns = {"forward": forward, "vanilla": vanilla, "two_backward": two_backward, "pareto_step": pareto_step,
           "integrate_only": integrate_only}
    return fns, sum(p.numel() for p in params)


MODULATES = ("lower", "middle", "upper", "all")


def checkpoint_switch(model):
    """mode(on): transformers' non-reentrant activation checkpointing on or off on `model` (enabled
    once, then toggled by the flags ``gradient_checkpointing_enable`` sets, without its warnings)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    flags = [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]

    def mode(on: bool) -> None:
        for m in flags:
            m.gradient_checkpointing = on

    return mode


def mode_rows(mode, on: bool, losses, vanilla_backward, steppers: dict) -> dict:
    """{row name (+ "_ckpt" when `on`): step} for one checkpointing mode: ``forward`` (the losses),
    ``vanilla`` (``vanilla_backward(text, image)``) and each of `steppers` (name -> fn(text, image))."""
    sfx = "_ckpt" if on else ""

    def forward():
        mode(on)
        with torch.enable_grad():
            losses()

    def vanilla():
        mode(on)
        vanilla_backward(*losses())

    def step(fn):
        def run():
            mode(on)
            fn(*losses())
        return run

    return {"forward" + sfx: forward, "vanilla" + sfx: vanilla, **{k + sfx: step(fn) for k, fn in steppers.items()}}


def build_traversals(config: str):
    """({row name: step function}, bitwise) of one configuration: vanilla, forward and the ParetoLoRA
    step per traversal, each without (suffix none) and with (suffix "_ckpt") activation checkpointing."""
    arch, *shape = CONFIGS[config]
    model, losses, arch_kwargs = (_llama if arch == "llama" else _chameleon)(*shape)
    params = [p for p in model.parameters() if p.requires_grad]
    mode = checkpoint_switch(model)

    def pl(traversal, modulate="lower"):
        return pareto_lora.ParetoLoRA(model, rule="pareto_lora", num_groups=4, modulate=modulate, traversal=traversal,
                                      **arch_kwargs)

    def rows(on: bool) -> dict:
        steppers = {"two_pass": pl("two_pass").backward, "batched": pl("batched").backward}
        steppers.update({f"sum_first_{m}": pl("sum_first", m).backward for m in MODULATES})
        return mode_rows(mode, on, losses, lambda lt, li: torch.autograd.grad(lt + li, params), steppers)

    two, bat = pl("two_pass"), pl("batched")
    mode(False)
    two.accumulate(*losses())
    bat.accumulate(*losses())
    bitwise = all(torch.equal(a, b) for a, b in zip(two.text.flats + two.image.flats, bat.text.flats + bat.image.flats))
    two.integrate_accumulated()
    bat.integrate_accumulated()
    return {**rows(False), **rows(True)}, bitwise


def traversal_row(config: str, ckpt: bool, t: dict[str, float], bitwise: bool) -> str:
    """One Markdown row of the traversal table from min times in ms."""
    sfx = "_ckpt" if ckpt else ""
    van, bwd = t["vanilla" + sfx], t["vanilla" + sfx] - t["forward" + sfx]
    x = lambda row: f"{t[row + sfx]:.1f} ({t[row + sfx] / van:.2f}×)"  # noqa: E731
    second = lambda row: f"{(t[row + sfx] - van) / bwd:.2f}"  # noqa: E731
    return (f"| {config} | {'on' if ckpt else 'off'} | {t['forward' + sfx]:.1f} | {van:.1f} | {bwd:.1f} | "
            f"{x('two_pass')} | {x('batched')} | {second('two_pass')} / {second('batched')} | "
            + " | ".join(x(f"sum_first_{m}") for m in MODULATES) + f" | {'yes' if bitwise else 'no'} |")


@pytest.fixture(scope="module", params=list(CONFIGS))
def steps(request):
    # One intra-op thread: on a shared 2-core box, OpenMP threads spinning against another
    # process's load made single steps 100x slower at random, swamping the differences measured.
    torch.set_num_threads(1)
    return build(request.param)[0]


@pytest.mark.parametrize("row", ROWS)
def test_step(benchmark, steps, row):
    benchmark(steps[row])


def table_row(config: str, nparams: int, t: dict[str, float]) -> str:
    """One Markdown row from min times in ms: the times, B, 2nd bwd / B, pareto / vanilla (floor), share."""
    arch, layers, hidden, batch_size, seq, rank = CONFIGS[config]
    bwd = t["vanilla"] - t["forward"]
    floor = (t["forward"] + 2 * bwd) / t["vanilla"]
    return (f"| {config}: {arch} ({layers}, {hidden}, {batch_size}, {seq}, {rank}) | {nparams:,} | {t['forward']:.2f} | "
            f"{t['vanilla']:.2f} | {t['two_backward']:.2f} | {t['pareto_step']:.2f} | {t['integrate_only']:.3f} | "
            f"{bwd:.2f} | {(t['two_backward'] - t['vanilla']) / bwd:.2f} | {t['pareto_step'] / t['vanilla']:.2f} "
            f"({floor:.2f}) | {t['integrate_only'] / t['pareto_step']:.2%} |")


def traversal_table(configs: list[str], rounds: int) -> None:
    import statistics

    from pareto_lora.app.benchmarking import interleaved, uptime

    print("| config | checkpointing | forward ms | vanilla ms | B ms | two_pass ms (× vanilla) | batched | 2nd grad / B "
          "(two_pass / batched) | sum_first lower | sum_first middle | sum_first upper | sum_first all | bitwise |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    notes = []
    for config in configs:
        fns, bitwise = build_traversals(config)
        timed = interleaved(fns, rounds=rounds, warmup=1)
        t = {k: v["min"] * 1e3 for k, v in timed.items()}
        for ckpt in (False, True):
            print(traversal_row(config, ckpt, t, bitwise), flush=True)
        for sfx in ("", "_ckpt"):
            van = timed["vanilla" + sfx]["times"]
            paired = {r: statistics.median(a / b for a, b in zip(timed[r + sfx]["times"], van))
                      for r in ("two_pass", "batched", *(f"sum_first_{m}" for m in MODULATES))}
            notes.append(f"{config}{sfx or ' (no checkpointing)'}: step / vanilla paired per round, median: "
                         + ", ".join(f"{r} {v:.2f}" for r, v in paired.items()))
        notes.append(f"{config}: {timed['vanilla']['rounds']} rounds; {uptime()}")
    print("\ntimes: min ms over interleaved rounds (× vanilla: ratio of the minima)")
    print("\n".join(notes) + "\n")


def main(argv=None) -> int:
    import argparse
    import datetime
    import statistics

    from pareto_lora.app.benchmarking import cpu_kernels, cpu_model, interleaved, uptime

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated from {', '.join(CONFIGS)}")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds per configuration (default 12)")
    p.add_argument("--table", default="both", choices=("step", "traversal", "both"),
                   help="the step table, the traversal table (issue 26) or both (default)")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; expected names from {', '.join(CONFIGS)}")

    cpu = cpu_model()
    torch.set_num_threads(1)
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; CPU: {cpu} ({os.cpu_count()} "
          f"logical CPUs); torch {torch.__version__}; {torch.get_num_threads()} intra-op thread")
    print(f"uptime before: {uptime()}; op's CPU build: {cpu_kernels()}")
    if args.table != "step":
        traversal_table(configs, args.rounds)
    if args.table == "traversal":
        print(f"uptime after: {uptime()}")
        return 0
    print("| config: arch (layers, hidden, batch, seq, r) | LoRA params | forward | vanilla | two_backward | pareto_step | "
          "integrate_only | B = backward | 2nd bwd / B | pareto / vanilla (floor) | integration share of step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for config in configs:
        fns, nparams = build(config)
        timed = interleaved(fns, rounds=args.rounds, warmup=1)
        print(table_row(config, nparams, {k: v["min"] * 1e3 for k, v in timed.items()}), flush=True)
        paired = statistics.median(p / v for p, v in zip(timed["pareto_step"]["times"], timed["vanilla"]["times"]))
        notes.append(f"{config}: medians ms " + ", ".join(f"{k} {v['median'] * 1e3:.2f}" for k, v in timed.items())
                     + f"; pareto / vanilla paired per round, median {paired:.2f}; {timed['forward']['rounds']} rounds; "
                     f"{uptime()}")
    print("\ntimes: min ms over interleaved rounds")
    print("\n".join(notes))
    print(f"uptime after: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
