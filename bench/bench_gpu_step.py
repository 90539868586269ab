"""A LoRA training step of a realistic-width unified model on the GPU (issue 28 §3–4, issue 26 §1b).

    python bench/bench_gpu_step.py                                   # CUDA, the issue's configuration
    python bench/bench_gpu_step.py --layers 16 --batch 4 --rounds 20
    python bench/bench_gpu_step.py --device cpu --layers 2 --hidden 64 --heads 4 --seq 64 \
        --text-vocab 512 --codes 128 --batch 2 --rounds 2 --dtype float32    # a smoke run on CPU

Model: a random-init ``ChameleonForConditionalGeneration`` (the Chameleon/Anole class: text and
image codes in one vocabulary, one LM head) built from a config, nothing downloaded; by default
hidden 2048, 8 layers, 16 heads, intermediate 5632, a vocabulary of 57,344 text ids + 8,192 image
codes (Chameleon's 65,536), sequence 1024 (a quarter text, half image codes between the image
markers, the rest text), bf16 weights, peft LoRA r = 16 on every linear layer (lora_B randomised:
peft's zero init would make every lora_A gradient zero). ``--batch auto`` (default) takes the
largest power of two up to ``--max-batch`` at which every contender's step fits in memory.

Contenders, interleaved round-robin in one process (``app.benchmarking.interleaved``: every round runs
each once, rotated; the device synchronised around each), every one without and with transformers'
non-reentrant activation checkpointing (the flag toggled on the same model):

  forward     the forward pass and both modality losses (``archs.modality_losses_for``)
  vanilla     forward + (L_text + L_image).backward()            one backward
  pareto      forward + ParetoLoRA(rule="pareto_lora", modulate="lower").backward()  (traversal "auto")
  two_pass    the same with traversal="two_pass"                 F + 2B (+2 recomputations)
  batched     the same with traversal="batched"                  one traversal for both objectives
  mimo        forward + ParetoLoRA(rule="mimo").backward()        MIMO's one weighted backward

and, once, the integration alone on ready buffers (``flat.flat_step``: statistics -> rule ->
combine over every LoRA parameter) with its kernel launches counted by ``torch.profiler``.
``.grad`` is cleared (set to None) after every step, so every contender starts alike; no optimizer.

Reported per checkpointing mode: min and median ms, × vanilla (ratio of the minima), B = vanilla −
forward, the second gradient's cost ``(step − vanilla) / B`` (1.0 at the F + 2B floor), the
integration's share of the ParetoLoRA step and peak memory per contender (``max_memory_allocated``
above the memory held before the step). The targets of issue 28: integration ≤ 1 % of the step,
the step ≤ 1.5× vanilla without checkpointing. Numbers only: nothing here asserts a time. The
Markdown table goes to stdout and, with the raw times, to ``$PARETO_LORA_BENCH_OUT`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import pareto_lora
from pareto_lora.app.benchmarking import environment, interleaved
from pareto_lora.flat import flat_step

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_training_step import chameleon_vocabulary_map, checkpoint_switch, mode_rows  # noqa: E402

CONTENDERS = ("forward", "vanilla", "pareto", "two_pass", "batched", "mimo")


def build_model(args, device: torch.device, dtype: torch.dtype):
    """The LoRA Chameleon of `args`, on `device` in `dtype` (weights initialised on the device)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    # The VQ image tokenizer is frozen and unused on token batches: kept tiny.
    vq = dict(embed_dim=8, num_embeddings=args.codes, latent_channels=8, base_channels=32, channel_multiplier=[1, 2],
              resolution=8, attn_resolutions=[])
    cfg = transformers.ChameleonConfig(
        vocab_size=args.text_vocab + args.codes + 2, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128), vocabulary_map=chameleon_vocabulary_map(args.text_vocab, args.codes),
        vq_config=vq)
    with torch.device(device):
        model = transformers.ChameleonForConditionalGeneration(cfg)
    model = model.to(dtype)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                             lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.train()


def make_batch(args, batch: int, device: torch.device) -> dict:
    """Rows: text, <racm3:break>, image codes (half the row), <eoss>, text."""
    gen = torch.Generator().manual_seed(batch)
    text, codes, seq = args.text_vocab, args.codes, args.seq
    boi, n_img = seq // 4, seq // 2
    ids = torch.randint(4, text, (batch, seq), generator=gen)
    ids[:, boi] = text + codes
    ids[:, boi + 1:boi + 1 + n_img] = torch.randint(text, text + codes, (batch, n_img), generator=gen)
    ids[:, boi + 1 + n_img] = text + codes + 1
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def step_functions(model, batch: dict):
    """{contender: step} for one checkpointing mode each (suffix "_ckpt"), plus the integration alone."""
    spec = pareto_lora.archs.detect_arch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    mode = checkpoint_switch(model)

    def losses():
        return pareto_lora.archs.modality_losses_for(model, batch, spec)

    def make_pl(**kw):
        return pareto_lora.ParetoLoRA(model, num_groups=min(4, model.config.num_hidden_layers), arch=spec, **kw)

    pls = {"pareto": make_pl(rule="pareto_lora", modulate="lower"),
           "two_pass": make_pl(rule="pareto_lora", modulate="lower", traversal="two_pass"),
           "batched": make_pl(rule="pareto_lora", modulate="lower", traversal="batched"),
           "mimo": make_pl(rule="mimo")}

    def clear() -> None:
        for p in params:
            p.grad = None

    def cleared(backward):
        def run(text, image):
            backward(text, image)
            clear()  # every contender starts from .grad None
        return run

    def rows(on: bool) -> dict:
        return mode_rows(mode, on, losses, cleared(lambda lt, li: (lt + li).backward()),
                         {k: cleared(pl.backward) for k, pl in pls.items()})

    # The integration alone on copies of one step's two buffers (a ParetoLoRA of its own, whose
    # accumulated step is then finished, so the contenders' objects start clean).
    pl = make_pl(rule="pareto_lora", modulate="lower")
    mode(False)
    pl.accumulate(*losses())
    text, image = [f.clone() for f in pl.text.flats], [f.clone() for f in pl.image.flats]
    pl.integrate_accumulated()
    clear()
    out = [torch.empty_like(f) for f in image]

    def integrate_only():
        flat_step(text, image, pl.layout, pl._sync.rule, out=out)

    return {**rows(False), **rows(True)}, integrate_only, sum(p.numel() for p in params)


def peak_memory(fn, device: torch.device) -> float:
    """GiB allocated at the peak of one call of `fn`, above what was allocated before it."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def kernel_launches(fn, device: torch.device) -> int | None:
    """Device kernels one call of `fn` launches (torch.profiler), or None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def fits(args, batch_size: int, device: torch.device, model) -> bool:
    """Whether every contender's step runs at `batch_size` (one call each, checkpointing off: the larger)."""
    try:
        fns, _, _ = step_functions(model, make_batch(args, batch_size, device))
        for name in CONTENDERS:
            fns[name]()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        for p in model.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def choose_batch(args, device, model) -> int:
    if args.batch != "auto":
        return int(args.batch)
    best, b = None, 1
    while b <= args.max_batch and fits(args, b, device, model):
        best, b = b, 2 * b
    if best is None:
        raise SystemExit("batch: not even 1 row fits in memory; try --layers or --seq smaller")
    return best


def table(t: dict, share: float, launches, mem: dict) -> list[str]:
    """Markdown rows, one per checkpointing mode."""
    lines = ["| checkpointing | forward ms | vanilla ms | B ms | pareto (auto) | two_pass | batched | "
             "2nd grad / B (two_pass / batched) | mimo | integration share of pareto | kernels | "
             "peak GiB vanilla / pareto / two_pass / batched |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for sfx in ("", "_ckpt"):
        van, fwd = t["vanilla" + sfx]["min"], t["forward" + sfx]["min"]
        bwd = van - fwd
        x = lambda k: f"{t[k + sfx]['min'] * 1e3:.1f} ({t[k + sfx]['min'] / van:.2f}×)"  # noqa: E731
        second = lambda k: f"{(t[k + sfx]['min'] - van) / bwd:.2f}"  # noqa: E731
        m = " / ".join(f"{mem[k + sfx]:.2f}" for k in ("vanilla", "pareto", "two_pass", "batched"))
        lines.append(f"| {'on' if sfx else 'off'} | {fwd * 1e3:.1f} | {van * 1e3:.1f} | {bwd * 1e3:.1f} | {x('pareto')} | "
                     f"{x('two_pass')} | {x('batched')} | {second('two_pass')} / {second('batched')} | {x('mimo')} | "
                     f"{share[sfx]:.2%} | {launches if launches is not None else 'n/a'} | {m} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=None, help="default: 11/4 x hidden (5632 at 2048)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--text-vocab", type=int, default=57_344)
    p.add_argument("--codes", type=int, default=8_192)
    p.add_argument("--batch", default="auto", help="rows per step, or auto (the largest power of two that fits)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=60.0, help="stop the rounds after this (at least 3 rounds)")
    p.add_argument("--out", default=os.environ.get("PARETO_LORA_BENCH_OUT"))
    args = p.parse_args(argv)
    if args.intermediate is None:
        args.intermediate = args.hidden * 11 // 4
    for name in ("layers", "hidden", "intermediate", "heads", "seq", "rank", "text_vocab", "codes", "rounds",
                 "max_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer")
    if args.seq < 8:
        p.error("--seq: expected at least 8 (text, markers and image codes)")
    if args.batch != "auto" and (not args.batch.isdigit() or int(args.batch) < 1):
        p.error("--batch: expected a positive integer or auto")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda is not available here (use --device cpu for a smoke run)")

    model = build_model(args, device, dtype)
    batch_size = choose_batch(args, device, model)
    fns, integrate_only, nparams = step_functions(model, make_batch(args, batch_size, device))
    mem = {name: peak_memory(fn, device) for name, fn in fns.items()}
    timed = interleaved(fns, device=device, rounds=args.rounds, warmup=1, max_seconds=args.max_seconds)
    integ = interleaved({"integrate": integrate_only}, device=device, rounds=max(args.rounds, 20), warmup=2)["integrate"]
    launches = kernel_launches(integrate_only, device)
    share = {sfx: integ["min"] / timed["pareto" + sfx]["min"] for sfx in ("", "_ckpt")}

    head = [f"# A LoRA training step on {args.device} (bench/bench_gpu_step.py)", "",
            environment(args.device), "",
            f"`python bench/bench_gpu_step.py {' '.join(argv if argv is not None else sys.argv[1:])}`: ChameleonForConditionalGeneration, "
            f"{args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
            f"vocabulary {args.text_vocab:,} + {args.codes:,} codes, {args.dtype}, LoRA r {args.rank} on all linear "
            f"layers ({nparams:,} LoRA parameters), batch {batch_size} x {args.seq}; "
            f"{timed['vanilla']['rounds']} interleaved rounds; integration alone {integ['min'] * 1e3:.3f} ms "
            f"(min of {integ['rounds']}).", ""]
    lines = head + table(timed, share, launches, mem)
    lines += ["", "times: min ms over the rounds (× vanilla in the same mode: ratio of the minima); medians in the JSON"]
    print("\n".join(lines), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_step.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        raw = {"args": vars(args), "batch": batch_size, "lora_params": nparams, "peak_gib": mem,
               "integration": integ, "kernels": launches,
               "times": {k: {"min": v["min"], "median": statistics.median(v["times"]), "times": v["times"]}
                         for k, v in timed.items()}}
        with open(os.path.join(args.out, "gpu_step.json"), "w") as f:
            json.dump(raw, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
