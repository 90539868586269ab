"""Does ParetoLoRA help on my data? A small study end to end on CPU, with pareto_lora.study.

Replace `run` with your own fine-tuning: it gets a method (``method.rule``: a ParetoLoRA rule, or
None for plain ``L_text + method.weight * L_image``) and a seed, draws everything random from the
seed, fine-tunes, and returns held-out metrics (lower is better). Here the model is a tiny random
Llama with LoRA on a synthetic interleaved text + image-token world, a few dozen steps per run:

    python examples/compare_on_your_data.py                 # 3 seeds, one rule; about half a minute
    python examples/compare_on_your_data.py --log study.jsonl   # resumable: rerun to finish it

This size says little about your model: the report's power line tells how much it can see.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import pareto_lora
from pareto_lora.study import Study

TEXT, IMAGE = 48, 32  # vocabulary: text ids [0, 48), image-token ids [48, 80)
HALF = 8  # a sequence: 8 text tokens, then 8 image tokens


def world(n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, 2*HALF] token ids: text follows a fixed bigram table, the image tokens a second one that
    starts from the last text token (the tables are the task: the same for every seed; `generator`
    draws the sequences)."""
    table = torch.Generator().manual_seed(1234)
    text_next, image_next = torch.randperm(TEXT, generator=table), torch.randperm(IMAGE, generator=table)
    seq = torch.empty(n, 2 * HALF, dtype=torch.long)
    seq[:, 0] = torch.randint(TEXT, (n,), generator=generator)
    for t in range(1, 2 * HALF):
        prev = seq[:, t - 1]
        follow = text_next[prev] if t < HALF else image_next[(prev - TEXT) % IMAGE if t > HALF else prev % IMAGE]
        noise = torch.randint(IMAGE if t >= HALF else TEXT, (n,), generator=generator)
        keep = torch.rand(n, generator=generator) < 0.8
        seq[:, t] = torch.where(keep, follow, noise) + (TEXT if t >= HALF else 0)
    return seq


def tiny_lora_llama(seed: int):
    """A random 2-layer Llama (the same base for every run) with LoRA initialised from `seed`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)  # peft's call
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=TEXT + IMAGE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * HALF)
    base = transformers.LlamaForCausalLM(cfg)
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


def losses(model, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=seq[:, :-1]).logits
    return pareto_lora.modality_losses(logits, seq[:, 1:], image_token_range=(TEXT, TEXT + IMAGE))


def make_run(steps: int, batch: int = 16):
    def run(method, seed):
        """Fine-tune with `method` from `seed` (LoRA init, data); held-out text and image losses."""
        model = tiny_lora_llama(seed)
        data = torch.Generator().manual_seed(seed)
        held_out = world(256, torch.Generator().manual_seed(10_000 + seed))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        pl = pareto_lora.ParetoLoRA(model, rule=method.rule) if method.rule is not None else None
        for _ in range(steps):
            text, image = losses(model, world(batch, data))
            if pl is not None:
                pl.backward(text=text, image=image)
            else:
                (text + method.weight * image).backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            text, image = losses(model.eval(), held_out)
        return {"text": text.item(), "image": image.item()}

    return run


def main(seeds: int = 3, steps: int = 40, rules=("pareto_lora",), weights=(1, 2, 4), log=None, verbose=False):
    """Run the study and return its :class:`~pareto_lora.study.Result`."""
    torch.set_num_threads(1)  # tiny matrices: threads cost more than they give
    study = Study(rules=list(rules), weights=weights, seeds=range(seeds), log=log)
    return study.run(make_run(steps), verbose=verbose)


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--seeds", type=int, default=3)
    cli.add_argument("--steps", type=int, default=40)
    cli.add_argument("--rules", nargs="+", default=["pareto_lora"])
    cli.add_argument("--weights", nargs="+", type=float, default=[1, 2, 4])
    cli.add_argument("--log", default=None, help="JSON-lines log: each finished run is kept; rerun to resume")
    a = cli.parse_args()
    print(main(a.seeds, a.steps, a.rules, a.weights, a.log, verbose=True).report())
