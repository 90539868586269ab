"""Five-line use of the integration op on two flat gradient buffers (CPU)."""

import torch

import pareto_lora

torch.manual_seed(0)
# Three LoRA groups back to back in one flat buffer; text gradients dominate and conflict a bit.
offsets = torch.tensor([0, 40_000, 90_000, 120_000])
g_image = 0.1 * torch.randn(120_000)
g_text = -0.5 * g_image + torch.randn(120_000)

res = pareto_lora.integrate(g_text, g_image, offsets, rule="pareto_lora", tau=0.5)

names = {int(c): c.name.lower() for c in pareto_lora.Case}
print(f"{'group':>5} {'|g_text|':>9} {'|g_image|':>9} {'cos':>7} {'ratio':>7} {'alpha':>7} {'beta':>7}  case")
for s in range(offsets.numel() - 1):
    print(
        f"{s:>5} {res.norm_a[s]:9.3f} {res.norm_b[s]:9.3f} {res.cosine[s]:7.3f} {res.ratio[s]:7.2f} "
        f"{res.coeffs[s, 0]:7.3f} {res.coeffs[s, 1]:7.3f}  {names[int(res.cases[s])]}"
    )
print("backends on cpu:", ", ".join(pareto_lora.available_backends("cpu")))
