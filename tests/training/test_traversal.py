"""Issue 26: the traversals of a step (pareto_lora.distributed.traversal) against today's two passes.

* "batched" (one vmap'd backward of the stacked losses) gives the gradients of two passes within
  their own rounding of the float64 oracle (often bitwise: not on every shape, the batched matmul
  may sum in another order), with and without transformers' non-reentrant activation
  checkpointing, on PEFT LoRA Llama and Chameleon, through accumulation and a GradScaler; "auto"
  takes it exactly under checkpointing.
* "sum_first": the text gradient bitwise that of two passes, the unmodulated groups bitwise the
  backward of the sum, the modulated groups' image gradient within its stated bound of the
  float64 oracle; refused where that bound does not hold (bfloat16, a balancer).
* Every path keeps the transactional guarantees: a failed backward changes nothing.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import pareto_lora
from pareto_lora.distributed.sync import set_traversal
from pareto_lora.distributed.traversal import custom_function_in, replay
from pareto_lora.rules import Case
from pareto_lora.training import ParetoLoRA

import models

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "archs"))
import arch_models as am  # noqa: E402


def checkpointed(model, on: bool = True):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def head_losses(model, batch, image_mask):
    """(text, image) token-mean cross-entropies in the model's own dtype (float64 for the oracle)."""
    hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states[-1][:, :-1]
    labels, image = batch["labels"][:, 1:], image_mask[:, 1:]
    head = model.get_output_embeddings()
    return F.cross_entropy(head(hidden[~image]), labels[~image]), F.cross_entropy(head(hidden[image]), labels[image])


def llama_head_losses(model, seed: int = 0):
    batch = models.token_batch(batch=2, seq=24, seed=seed)
    return head_losses(model, batch, batch["image_token_mask"])


def chameleon_head_losses(model, seed: int = 0):
    batch = am.chameleon_batch(seed)
    return head_losses(model, batch, pareto_lora.archs.image_token_mask(model, batch))


def llama_losses(model, seed: int = 0):
    batch = models.token_batch(batch=2, seq=24, seed=seed)
    out = model(**models.model_inputs(batch))
    return pareto_lora.modality_losses(out.logits, batch["labels"], image_token_mask=batch["image_token_mask"])


def chameleon_losses(model, seed: int = 0):
    batch = am.chameleon_batch(seed)
    return pareto_lora.archs.modality_losses_for(model, batch)


def run(model, losses, traversal, micro=2, scaler=None, **kw):
    """(traversal taken, text buffers, image buffers, integrated .grad, report) after `micro` accumulated micro-batches."""
    pl = ParetoLoRA(model, num_groups=2, traversal=traversal, **kw)
    for k in range(micro):
        pl.accumulate(*losses(model, k), scaler=scaler)
    text, image = [f.clone() for f in pl.text.flats], [f.clone() for f in pl.image.flats]
    report = pl.integrate_accumulated()
    return pl._sync.last_traversal, text, image, [p.grad.clone() for p in pl.layout.params], report


def same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("arch", ["llama", "chameleon"])
def test_batched_against_two_passes_and_the_float64_oracle(arch, ckpt):
    if arch == "llama":
        model, losses = checkpointed(models.lora_llama(num_layers=4), ckpt), llama_head_losses
    else:
        model, losses = checkpointed(am.lora(am.tiny_chameleon()), ckpt), chameleon_head_losses
    want = run(model, losses, "two_pass")
    got = run(model, losses, "batched")
    auto = run(model, losses, "auto")
    oracle = run(copy.deepcopy(model).double(), losses, "two_pass")
    assert want[0] == "two_pass" and got[0] == "batched" and auto[0] == ("batched" if ckpt else "two_pass")
    for res in (got, auto):
        # Stated bound, per objective and parameter: both are float32 evaluations of the same sums
        # (only a batched matmul's order may differ), so the batched one is at most twice as far
        # from float64 as two passes, plus one rounding of the result.
        for k in (1, 2):  # the text and the image buffers (two accumulated micro-batches)
            for x, y, z in zip(res[k], want[k], oracle[k]):
                err, err_two_pass = (x.double() - z).norm().item(), (y.double() - z).norm().item()
                assert err <= 2 * err_two_pass + 2.0**-24 * z.norm().item()
        assert res[4].cases == want[4].cases


def test_batched_with_a_grad_scaler_equals_two_passes():
    model = checkpointed(models.lora_llama(num_layers=3))
    want = run(model, llama_losses, "two_pass", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    got = run(model, llama_losses, "auto", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert got[0] == "batched" and same(got[3], want[3])


def test_auto_takes_two_passes_in_eval_mode_for_other_dtypes_and_custom_functions():
    model = checkpointed(models.lora_llama(num_layers=3))
    pl = ParetoLoRA(model, num_groups=2)
    lt, li = llama_losses(model)
    assert pl._sync.choose_traversal(lt, li) == "batched" and not custom_function_in(lt, li)
    assert pl._sync.choose_traversal(lt, li.double()) == "two_pass"

    class Scale(torch.autograd.Function):  # vmap may not batch a Python backward: not attempted
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    assert custom_function_in(Scale.apply(lt), li)
    assert pl._sync.choose_traversal(Scale.apply(lt), li) == "two_pass"
    model.eval()  # transformers checkpoints only in training mode
    assert pl._sync.choose_traversal(lt, li) == "two_pass"


NAMES = ("prompt", "answer", "image")


def three_losses(model, seed: int = 0):
    """K = 3: prompt (text before the image), answer (text after it), image: token means."""
    batch = models.token_batch(batch=2, seq=24, seed=seed)
    logits = model(**models.model_inputs(batch)).logits[:, :-1]
    labels, image = batch["labels"][:, 1:], batch["image_token_mask"][:, 1:]
    early = torch.arange(labels.shape[1]) < 6
    return {"prompt": F.cross_entropy(logits[~image & early], labels[~image & early]),
            "answer": F.cross_entropy(logits[~image & ~early], labels[~image & ~early]),
            "image": F.cross_entropy(logits[image], labels[image])}


def run_many(model, traversal, micro=2):
    """(traversal taken, the K buffers, integrated .grad) after `micro` accumulated micro-batches, K = 3."""
    pl = ParetoLoRA(model, num_groups=2, objectives=NAMES, traversal=traversal)
    for k in range(micro):
        pl.accumulate(**three_losses(model, k))
    bufs = [[f.clone() for f in g.flats] for g in pl.grads]
    pl.integrate_accumulated()
    return pl._sync.last_traversal, bufs, [p.grad.clone() for p in pl.layout.params]


@pytest.mark.parametrize("ckpt", [False, True])
def test_k_objectives_batched_against_k_passes_and_the_float64_oracle(ckpt):
    model = checkpointed(models.lora_llama(num_layers=4), ckpt)
    want, got, auto = run_many(model, "two_pass"), run_many(model, "batched"), run_many(model, "auto")
    oracle = run_many(copy.deepcopy(model).double(), "two_pass")
    assert want[0] == "two_pass" and got[0] == "batched" and auto[0] == ("batched" if ckpt else "two_pass")
    for res in (got, auto):
        for k in range(len(NAMES)):  # the stated bound of batched, per objective and parameter
            for x, y, z in zip(res[1][k], want[1][k], oracle[1][k]):
                err, err_k_passes = (x.double() - z).norm().item(), (y.double() - z).norm().item()
                assert err <= 2 * err_k_passes + 2.0**-24 * z.norm().item()


def test_replay_adds_the_gradients_bitwise_through_the_accumulation_hooks():
    """What DDP's one traversal relies on: a backward from the parameters adds exactly the given
    gradients into .grad, as the loss's backward does, and runs the hooks on their accumulators
    (DDP's reducer hooks sit there); None delivers nothing and runs no hook."""
    model = checkpointed(models.lora_llama(num_layers=2))
    params = [p for p in model.parameters() if p.requires_grad]
    start = [torch.randn_like(p) for p in params]
    _, image = llama_losses(model)
    grads = torch.autograd.grad(image, params, retain_graph=True)
    for p, s in zip(params, start):
        p.grad = s.clone()
    image.backward()
    want = [p.grad.clone() for p in params]
    seen = []
    for p, s in zip(params, start):
        p.grad = s.clone()
        p.register_post_accumulate_grad_hook(lambda q: seen.append(id(q)))
    replay(params, grads[:-1] + (None,))
    assert same([p.grad for p in params[:-1]], want[:-1]) and torch.equal(params[-1].grad, start[-1])
    assert sorted(seen) == sorted(id(p) for p in params[:-1])


@pytest.mark.parametrize("traversal", ["batched", "sum_first", "auto"])
def test_a_failed_backward_changes_nothing(traversal):
    model = checkpointed(models.lora_llama(num_layers=3))
    pl = ParetoLoRA(model, num_groups=3, modulate="upper", traversal=traversal)
    pl.accumulate(*llama_losses(model, 0))
    before = ([p.grad.clone() for p in pl.layout.params], [f.clone() for f in pl.text.flats],
              [f.clone() for f in pl.image.flats], pl.micro_batches, pl._losses.clone())
    text, image = llama_losses(model, 1)
    torch.autograd.grad(image, [p for p in model.parameters() if p.requires_grad])  # frees the image graph
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        pl.accumulate(text, image)
    after = ([p.grad for p in pl.layout.params], pl.text.flats, pl.image.flats, pl.micro_batches, pl._losses)
    assert same(before[0], after[0]) and same(before[1], after[1]) and same(before[2], after[2])
    assert before[3] == after[3] and torch.equal(before[4], after[4])


@pytest.mark.parametrize("traversal", ["batched", "sum_first"])
def test_the_checks_run_before_the_backward(traversal):
    model = models.lora_llama(num_layers=3)
    other = models.lora_llama(num_layers=3, seed=1)
    pl = ParetoLoRA(model, num_groups=3, modulate="upper", traversal=traversal)
    lt, li = llama_losses(model)
    ot, oi = llama_losses(other)
    with pytest.raises(ValueError, match="^text: the loss does not depend"):
        pl.backward(ot, li)
    with pytest.raises(ValueError, match="^image: the loss does not depend"):
        pl.backward(lt, oi)
    pl.accumulate(lt, li)
    pl.layout.params[0].grad = None  # a zero_grad() mid-accumulation
    with pytest.raises(RuntimeError, match="reset or replaced"):
        pl.accumulate(*llama_losses(model, 1))


def _groups(pl, vectors, active: bool):
    """The concatenation of `vectors` (one per parameter) over the (un)modulated groups' parameters."""
    lay = pl.layout
    act = lay.active[lay.unit_group].tolist()
    return torch.cat([v.reshape(-1) for v, u in zip(vectors, lay.param_unit) if act[u] == active])


def _grads(model, loss, params):
    return [g.detach().clone() for g in torch.autograd.grad(loss, params, retain_graph=True)]


@pytest.mark.parametrize("text_scale", [1.0, 1e3])
@pytest.mark.parametrize("modulate", ["upper", "middle"])
def test_sum_first_against_two_passes_and_the_float64_oracle(modulate, text_scale):
    model = models.lora_llama(num_layers=6)
    pl = ParetoLoRA(model, num_groups=3, modulate=modulate, traversal="sum_first")
    lt, li = llama_head_losses(model)
    params = pl.layout.params
    a32, b32, s32 = _grads(model, lt * text_scale, params), _grads(model, li, params), \
        _grads(model, lt * text_scale + li, params)
    pl.accumulate(lt * text_scale, li)
    b_sum_first = _groups(pl, pl.image.views, True).double()  # before the integration overwrites it
    report = pl.integrate_accumulated()
    assert pl._sync.last_traversal == "sum_first"
    # the text gradient of the modulated groups: the same backward as two passes, bitwise
    assert torch.equal(_groups(pl, pl.text.views, True), _groups(pl, a32, True))
    assert not _groups(pl, pl.text.views, False).any()
    # the unmodulated groups: (0, s) integrated as a plain sum, i.e. the backward of the sum, bitwise
    assert torch.equal(_groups(pl, [p.grad for p in params], False), _groups(pl, s32, False))
    # the stated bound of the modulated groups' image gradient b~ = s - a against float64:
    # |b~ - b| <= eta (|s| + |a|) + u |b~|, eta the float32 backward's own relative error
    model64 = copy.deepcopy(model).double()
    lt64, li64 = llama_head_losses(model64)
    position = {id(p): k for k, p in enumerate(model.parameters())}
    p64 = [list(model64.parameters())[position[id(p)]] for p in params]  # in the layout's order
    a64, b64, s64 = (_groups(pl, _grads(model64, x, p64), True) for x in (lt64 * text_scale, li64, lt64 * text_scale + li64))
    eta = max(((_groups(pl, x, True).double() - y).norm() / y.norm()).item() for x, y in ((a32, a64), (b32, b64), (s32, s64)))
    err = (b_sum_first - b64).norm().item()
    bound = eta * (s64.norm() + a64.norm()).item() + 2.0**-24 * b_sum_first.norm().item()
    assert err <= bound
    # the bound is what it costs: with a text gradient 1000x the image one, b~'s error is well
    # above that of two passes (this is why sum_first is opt-in)
    err_two_pass = (_groups(pl, b32, True).double() - b64).norm().item()
    if text_scale > 1:
        assert err > 10 * err_two_pass
    # the unmodulated groups' statistics were not taken
    assert all(report.cases[g] == int(Case.INACTIVE) for g in range(3) if not bool(pl.layout.active[g]))
    stats = pl.last_report._fetch()["group_stats"]
    assert torch.isnan(stats[~pl.layout.active.cpu()]).all() and not torch.isnan(stats[pl.layout.active.cpu()]).any()


def test_sum_first_with_nothing_modulated_is_one_backward_of_the_sum():
    model = models.lora_llama(num_layers=3)
    pl = ParetoLoRA(model, num_groups=3, modulate="none", traversal="sum_first")
    lt, li = llama_losses(model)
    want = _grads(model, lt + li, pl.layout.params)
    pl.backward(lt, li)
    assert same([p.grad for p in pl.layout.params], want)


def test_sum_first_under_checkpointing_equals_without():
    plain = run(models.lora_llama(num_layers=4), llama_losses, "sum_first", modulate="upper")
    ckpt = run(checkpointed(models.lora_llama(num_layers=4)), llama_losses, "sum_first", modulate="upper")
    assert same(plain[3], ckpt[3])


def test_traversal_errors():
    model = models.lora_llama(num_layers=3)
    with pytest.raises(ValueError, match="^traversal: expected one of auto, two_pass, batched, sum_first, got"):
        ParetoLoRA(model, traversal="vmap")
    with pytest.raises(ValueError, match="^traversal: 'sum_first' does not apply to a balancer"):
        ParetoLoRA(model, balancer="mimo", traversal="sum_first")
    with pytest.raises(ValueError, match="^traversal: 'sum_first' expected float32 or float64"):
        ParetoLoRA(models.lora_llama(num_layers=3).to(torch.bfloat16), traversal="sum_first")
    for traversal in ("batched", "sum_first"):  # a sync that names no refused traversal takes two passes
        with pytest.raises(ValueError, match="^traversal: expected 'auto', 'two_pass' under object, got"):
            set_traversal(object(), traversal, balanced=False)


def test_the_traversal_benchmark_rows_run(monkeypatch):
    """bench/bench_training_step.py --table traversal on a tiny Llama: every row runs once, the row
    reads (no time asserted)."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "bench"))
    mod = importlib.import_module("bench_training_step")
    monkeypatch.setitem(mod.CONFIGS, "tiny", ("llama", 4, 32, 2, 64, 4))
    fns, bitwise = mod.build_traversals("tiny")
    rows = ["forward", "vanilla", "two_pass", "batched", *(f"sum_first_{m}" for m in mod.MODULATES)]
    assert list(fns) == rows + [r + "_ckpt" for r in rows] and isinstance(bitwise, bool)
    for fn in fns.values():
        fn()
    row = mod.traversal_row("tiny", True, {k: float(i + 1) for i, k in enumerate(fns)}, bitwise)
    assert row.startswith("| tiny | on | 9.0 | 10.0 | 1.0 |") and row.count("|") == 14


@pytest.mark.parametrize("name", am.ARCHS)
def test_batched_on_every_architecture_under_checkpointing(name):
    """Chameleon, Emu3, Janus, LLaVA with checkpointing: auto takes the batched backward (cut where the
    losses' graphs meet, below the heads Chameleon and Emu3 apply to each loss's rows and Janus'
    two heads), within the bound."""
    from pareto_lora.distributed.traversal import _split

    base = am.MODELS[name]()
    model = checkpointed(am.lora(base, exclude_modules=pareto_lora.archs.detect_arch(base).lora_exclude_modules))
    spec = pareto_lora.archs.detect_arch(model)

    def losses(m, seed):
        return pareto_lora.archs.modality_losses_for(m, am.BATCHES[name](seed=seed), spec)

    lt, li = losses(model, 0)
    if name != "llava":  # heads applied to each loss's own rows: a cut below them
        assert _split(lt, li) is not None
    want = run(model, losses, "two_pass", arch=spec)
    got = run(model, losses, "auto", arch=spec)
    oracle = run(copy.deepcopy(model).double(), losses, "two_pass", arch=spec)
    assert got[0] == "batched"
    for k in (1, 2):
        for x, y, z in zip(got[k], want[k], oracle[k]):
            assert (x.double() - z).norm().item() <= 2 * (y.double() - z).norm().item() + 2.0**-24 * z.norm().item()
