"""The float64 oracle of a grouped integration: the reference backend on each group's flattened gradients
(shared by the training and architecture tests)."""

import torch

import pareto_lora


def oracle(grads, groups, active, rule, tau=0.5):
    """The float64 reference (backend="reference") per group; inactive groups get the plain sum."""
    out = {}
    for g in sorted(set(groups.values())):
        names = [n for n in grads if groups[n] == g]
        a = torch.cat([grads[n][0].reshape(-1) for n in names]).double()
        b = torch.cat([grads[n][1].reshape(-1) for n in names]).double()
        res, _, _, _ = pareto_lora.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, tau=tau,
                                             active=torch.tensor([g in active]), backend="reference")
        pos = 0
        for n in names:
            k = grads[n][0].numel()
            out[n] = res[pos : pos + k].view_as(grads[n][0])
            pos += k
    return out
