"""How one process takes the two objectives' gradients: the backward traversals of a step.

``ParetoLoRA(traversal=...)`` picks one. One process (:class:`~.sync.LocalSync`) takes any;
DDP and FSDP2 take ``two_pass`` and ``batched`` (``sum_first`` is not built there,
:func:`sum_first_not_built`). DDP's communication hook sees only an ordinary backward, so the
batched image gradient is handed to it by :func:`replay`. FSDP2's registered parameters are
sharded DTensors the forward never uses; the batched traversal targets the unsharded ones the
forward used and reduce-scatters outside FSDP2, under its default reduction only
(:mod:`.fsdp_traversal`, which says why and what was measured).

* ``"two_pass"``: ``autograd.grad(text)`` with the graph kept, then ``autograd.grad(image)``:
  F + 2B, and under activation checkpointing each pass recomputes the checkpointed forward
  (F + 2(F' + B), F' the recomputation).
* ``"batched"``: one ``autograd.grad`` with a batch of the two cotangents (``is_grads_batched``:
  vmap over the backward) through the part of the graph both losses reach; each loss's own part
  above it (a head applied to its own rows) in its own pass (:func:`batched`). Every shared node
  runs once with a batch of two cotangents, so a checkpointed segment is recomputed once for both
  objectives (F + F' + 2B). The gradients are the same computation as two passes; on CPU they are bitwise
  equal to them on the benchmark's configurations, not on every shape (a batched matmul may sum
  in another order): within ``|g - g64| <= 2 |g_two_pass - g64| + u |g64|`` of the float64 oracle
  (tests/training/test_traversal.py). Memory: two cotangents travel together, so the gradients
  of the activations take twice the memory of one pass (one layer at a time under checkpointing).
* ``"auto"`` (default): ``"batched"`` where it is faster, i.e. when the model runs with
  non-reentrant activation checkpointing (a module with ``gradient_checkpointing`` set, as
  ``transformers``' ``gradient_checkpointing_enable`` sets it, in training mode), else
  ``"two_pass"``. Without checkpointing the batched backward measured slower on CPU
  (bench/RESULTS.md): on this FLOP-bound CPU step a batch of two cotangents costs about two
  backwards, and vmap has its own overhead. It also falls
  back to two passes when the two losses differ in dtype or the graph holds a custom
  ``autograd.Function`` (bitsandbytes layers, reentrant checkpointing), whose backward vmap may
  not be able to batch (that walk over the graph: 0.7 ms for the 1,242 nodes of an 8-layer
  LoRA Chameleon on CPU).
* ``"sum_first"``: a backward of ``text + image`` for every parameter, then the text objective
  alone for the *modulated* groups' parameters (autograd prunes the graph below the lowest of
  them), their image gradient the difference ``b = s - a``. Opt-in (see :func:`sum_first`
  for its bound): the unmodulated groups get the exact sum, their statistics are not taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["TRAVERSALS", "sum_first_not_built", "batched_pays", "checkpointing_modules", "custom_function_in", "two_pass", "batched",
           "batched_many", "sum_first", "replay"]

TRAVERSALS = ("auto", "two_pass", "batched", "sum_first")


def sum_first_not_built(kind: str) -> str:
    """Why `kind` (DDP, FSDP2) does not take ``traversal="sum_first"`` (set_traversal's message)."""
    return (f"not built under {kind}: its unmodulated groups' statistics are never taken, which the report would "
            "have to mark (one process reports them as NaN), and nothing tests it there")

Grads = tuple  # one entry per parameter: a gradient Tensor or None (the loss does not reach it)


def checkpointing_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that carry a ``gradient_checkpointing`` flag (transformers' layers and models)."""
    return [m for m in model.modules() if isinstance(getattr(m, "gradient_checkpointing", None), bool)]


def custom_function_in(*losses: torch.Tensor) -> bool:
    """Whether the graphs of `losses` hold a node of a Python ``autograd.Function``."""
    stack, seen = [loss.grad_fn for loss in losses], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction) and not _passes_through(node):
            return True
        stack.extend(n for n, _ in node.next_functions)
    return False


#: Python autograd Functions whose backward returns the cotangents as they came (a batch of two
#: passes through unchanged): DDP's ``_DDPSink`` (on its outputs with ``find_unused_parameters``),
#: FSDP2's ``RegisterPostBackwardFunction`` (its backward runs FSDP2's post-backward first).
PASS_THROUGH = {("torch.nn.parallel.distributed", "_DDPSink"),
                ("torch.distributed.fsdp._fully_shard._fsdp_param_group", "RegisterPostBackwardFunction")}


def _passes_through(node) -> bool:
    cls = getattr(node, "_forward_cls", None)
    return cls is not None and (cls.__module__, cls.__name__) in PASS_THROUGH


def batched_pays(checkpointing: Sequence[nn.Module], *losses: torch.Tensor) -> bool:
    """``"auto"``'s choice of ``"batched"``: non-reentrant checkpointing on (one of `checkpointing`,
    :func:`checkpointing_modules`, in training mode), one dtype, no Python Function vmap may not batch."""
    on = any(m.gradient_checkpointing and m.training for m in checkpointing)
    return on and len({loss.dtype for loss in losses}) == 1 and not custom_function_in(*losses)


def two_pass(text_loss: torch.Tensor, image_loss: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[Grads, Grads]:
    text = torch.autograd.grad(text_loss, params, retain_graph=True, allow_unused=True)
    image = torch.autograd.grad(image_loss, params, allow_unused=True)
    return text, image


def _reach(roots) -> set:
    stack, seen = [r for r in roots if r is not None], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return seen


def _split(text_loss: torch.Tensor, image_loss: torch.Tensor):
    """(edges, text-only nodes, image-only nodes, shared nodes) where the two losses' graphs meet,
    or None where no clean cut exists.

    ``edges``: every edge from a node only one loss reaches into a node both reach (an LM head
    applied to each loss's own rows meets the trunk at the last hidden state). A clean cut: the
    roots are not shared, no edge ends in a leaf, and no edge's node lies below another's (else
    the gradient at the lower edge would already count the path through the upper one). Taken only
    where a loss's own part holds a matrix product: for a few masked means (what
    :func:`pareto_lora.modality_losses` leaves above the shared per-token loss) the two extra passes
    cost more than they save.
    """
    t_root, i_root = text_loss.grad_fn, image_loss.grad_fn
    text, image = _reach([t_root]), _reach([i_root])
    shared = text & image
    if not shared or t_root in shared or i_root in shared:
        return None
    if not any("mm" in type(n).__name__.lower() for n in text ^ image):
        return None  # no matrix product (a head) in either loss's own part: the cut would save nothing
    edges = list(dict.fromkeys((c, nr) for p in text ^ image for c, nr in p.next_functions if c in shared))
    nodes = {c for c, _ in edges}
    if any(hasattr(c, "variable") for c in nodes) or nodes & _reach([n for c in nodes for n, _ in c.next_functions]):
        return None
    return [torch.autograd.graph.GradientEdge(c, nr) for c, nr in edges], text - shared, image - shared, shared


def batched(text_loss: torch.Tensor, image_loss: torch.Tensor, params: Sequence[torch.Tensor]) -> tuple[Grads, Grads]:
    """Both gradients in one traversal of the part of the graph both losses reach.

    Where the graphs meet at a clean cut (:func:`_split`), each loss's own part (e.g. a head
    applied to its own rows) runs in its own small pass down to the cut, and only the shared part
    is batched: a batched backward of the whole graph would send each cotangent, zero included,
    through the other loss's part too. Else the stacked losses are batched from the top.
    """
    cut = _split(text_loss, image_loss)
    if cut is None:
        losses = torch.stack([text_loss.reshape(()), image_loss.reshape(())])
        eye = torch.eye(2, dtype=losses.dtype, device=losses.device)
        grads = torch.autograd.grad(losses, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
        return tuple(None if g is None else g[0] for g in grads), tuple(None if g is None else g[1] for g in grads)
    edges, text_only, image_only, shared = cut
    node = [torch.autograd.graph.get_gradient_edge(p).node for p in params]
    text: list[torch.Tensor | None] = [None] * len(params)
    image: list[torch.Tensor | None] = [None] * len(params)
    cotangents = []
    # Each loss's own part: graph freed as it goes (nothing there is needed again).
    for loss, only, out in ((text_loss, text_only, text), (image_loss, image_only, image)):
        own = [k for k, n in enumerate(node) if n in only]
        got = torch.autograd.grad(loss, edges + [params[k] for k in own], allow_unused=True)
        cotangents.append(got[: len(edges)])
        for k, g in zip(own, got[len(edges) :]):
            out[k] = g
    outputs, stacked = [], []
    for e, a, b in zip(edges, *cotangents):
        if a is None and b is None:
            continue
        outputs.append(e)
        stacked.append(torch.stack([torch.zeros_like(b) if a is None else a, torch.zeros_like(a) if b is None else b]))
    both = [k for k, n in enumerate(node) if n in shared]
    if outputs and both:
        grads = torch.autograd.grad(outputs, [params[k] for k in both], grad_outputs=stacked, is_grads_batched=True,
                                    allow_unused=True)
        for k, g in zip(both, grads):
            if g is not None:
                text[k], image[k] = g[0], g[1]
    return tuple(text), tuple(image)


def batched_many(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> list[Grads]:
    """K objectives' gradients in one traversal (K objectives, :mod:`pareto_lora.distributed.multi`):
    two as :func:`batched`; more from the top, the stacked losses with the K x K identity as
    batched cotangents (each loss's own part, e.g. a head on its rows, then sees K cotangents, K - 1
    of them zero: not cut, unlike two). Same bound against the float64 oracle as :func:`batched`."""
    if len(losses) == 2:
        return list(batched(losses[0], losses[1], params))
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    eye = torch.eye(len(losses), dtype=stacked.dtype, device=stacked.device)
    grads = torch.autograd.grad(stacked, params, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    return [tuple(None if g is None else g[k] for g in grads) for k in range(len(losses))]


def sum_first(text_loss: torch.Tensor, image_loss: torch.Tensor, params: Sequence[torch.Tensor],
              modulated: Sequence[int]) -> tuple[Grads, Grads]:
    """(text, image): text only on the ``modulated`` parameter indices (None elsewhere), image
    ``s - a`` there and the sum ``s`` of both objectives elsewhere.

    The text backward runs first, with the graph kept (it visits only the part above the lowest
    modulated parameter); the backward of the sum then frees the whole graph, so nothing of it
    outlives the call. Bound: ``s`` and ``a`` are each a float backward with relative error eta
    (its own rounding), so ``|b~ - b| <= eta (|s| + |a|) + u |b~| <= eta (2|a| + |b|) + u |b~|``
    in norm: the image gradient's relative error grows with ``|a| / |b|`` (the text/image ratio
    the rule reacts to), which is why it is opt-in and float32/float64 only (in bfloat16 eta is
    2^-8). tests/training/test_traversal.py checks it against the float64 oracle.
    """
    mod_params = [params[i] for i in modulated]
    text_mod = torch.autograd.grad(text_loss, mod_params, retain_graph=True, allow_unused=True) if mod_params else ()
    total = torch.autograd.grad(text_loss + image_loss, params, allow_unused=True)
    text: list[torch.Tensor | None] = [None] * len(params)
    image = list(total)
    for i, a in zip(modulated, text_mod):
        if a is None:
            continue
        text[i] = a
        image[i] = a.neg() if total[i] is None else total[i].sub_(a)  # total[i] is this call's own tensor
    return tuple(text), tuple(image)


def replay(params: Sequence[torch.Tensor], grads: Grads) -> None:
    """Deliver already computed gradients to ``params`` through an ordinary backward that starts
    at the parameters themselves (``torch.autograd.backward(params, grads)``).

    No node of the model's graph runs: the backward's roots are the parameters' own
    ``AccumulateGrad`` nodes, so each ``.grad`` receives ``+= g`` exactly as a backward of the
    loss would add it (bitwise), and the hooks on those nodes run as in that backward: DDP's
    reducer marks each parameter ready, fills and reduces its buckets, finishes the step.
    ``None`` (the loss does not reach a parameter) delivers nothing, as that backward would not.
    """
    got = [(p, g) for p, g in zip(params, grads) if g is not None]
    torch.autograd.backward([p for p, _ in got], grad_tensors=[g for _, g in got])
