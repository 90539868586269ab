"""The float64 oracle of a grouped integration: reference.integrate on each group's flattened gradients
(shared by the training and architecture tests)."""

import torch

from pareto_lora import reference


def oracle(grads, groups, active, rule, tau=0.5):
    """reference.integrate on each group's flattened gradients; inactive groups get the plain sum."""
    out = {}
    for g in sorted(set(groups.values())):
        names = [n for n in grads if groups[n] == g]
        a = torch.cat([grads[n][0].reshape(-1) for n in names]).double()
        b = torch.cat([grads[n][1].reshape(-1) for n in names]).double()
        res, _, _, _ = reference.integrate(a, b, torch.tensor([0, a.numel()]), rule=rule, tau=tau,
                                           active=torch.tensor([g in active]))
        pos = 0
        for n in names:
            k = grads[n][0].numel()
            out[n] = res[pos : pos + k].view_as(grads[n][0])
            pos += k
    return out
