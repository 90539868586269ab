"""Issue 27: ParetoLoRA driven through random sequences of calls, good and failing.

A hypothesis state machine mixes backward (step or accumulate), integrate_accumulated,
zero_grad, state_dict / load_state_dict and calls that must fail (bad losses, a loss of another
model, a freed graph, bad checkpoints, integrating nothing). After every failing call ``.grad``
and ParetoLoRA's state are exactly as they were; after every good one the micro-batch count is
what the sequence implies. Small (a 2-layer model, a few dozen calls) to run in well under a minute.
"""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

import pareto_lora  # noqa: E402
from pareto_lora.training import ParetoLoRA  # noqa: E402

import models  # noqa: E402

MODEL = models.lora_llama(num_layers=2, hidden=16)
OTHER = models.lora_llama(num_layers=2, hidden=16, seed=1)
BATCHES = [models.token_batch(batch=1, seq=12, seed=s, image_span=(3, 8)) for s in range(4)]


def losses(model, seed):
    b = BATCHES[seed]
    out = model(**models.model_inputs(b))
    return pareto_lora.modality_losses(out.logits, b["labels"], image_token_mask=b["image_token_mask"])


def snapshot(pl):
    grads = [None if p.grad is None else p.grad.clone() for p in pl.layout.params]
    return (pl.micro_batches, pl._losses.clone(), pl._bad.clone(), pl._scaled, pl.spec,
            [f.clone() for f in pl.text.flats], [f.clone() for f in pl.image.flats], grads)


def same(x, y) -> bool:
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    return x == y


def _bad_state(sd, kind):
    sd = dict(sd)
    if kind == "losses_shape":
        sd["losses"] = torch.zeros(3, dtype=torch.float64)
    elif kind == "micro_str":
        sd["micro_batches"] = "two"
    elif kind == "missing":
        del sd["nonfinite"]
    elif kind == "buffers":
        sd["micro_batches"], sd["text"], sd["image"] = 1, [torch.zeros(2)], [torch.zeros(2)]
    elif kind == "rule":
        sd["rule"] = dict(sd["rule"], tau=float("nan"))
    return sd


class ParetoLoRAMachine(RuleBasedStateMachine):
    @initialize(rule=st.sampled_from(["pareto_lora", "mmpareto", "sum"]))
    def build(self, rule):
        MODEL.zero_grad(set_to_none=True)
        self.pl = ParetoLoRA(MODEL, rule=rule, modulate="all")
        self.micro = 0
        self.saved = []
        self.zeroed = False  # a zero_grad() ran inside the current window

    def fails(self, call, error=(ValueError, RuntimeError)):
        before = snapshot(self.pl)
        with pytest.raises(error):
            call()
        assert same(before, snapshot(self.pl)), "a failing call changed .grad or the state"

    # ---- good calls --------------------------------------------------------------------------
    @precondition(lambda self: not self.zeroed)
    @rule(seed=st.integers(0, 3), step=st.booleans())
    def backward(self, seed, step):
        self.pl.backward(*losses(MODEL, seed), step=step)
        self.micro = 0 if step else self.micro + 1

    @precondition(lambda self: self.micro > 0)
    @rule()
    def integrate(self):
        report = self.pl.integrate_accumulated()
        assert report.micro_batches == self.micro
        self.micro, self.zeroed = 0, False

    @rule()
    def zero_grad(self):
        MODEL.zero_grad(set_to_none=True)
        self.zeroed = self.micro > 0

    @precondition(lambda self: not self.zeroed)
    @rule()
    def save(self):
        self.saved.append((self.pl.state_dict(), self.micro))

    @precondition(lambda self: bool(self.saved))
    @rule(data=st.data())
    def load(self, data):
        sd, micro = data.draw(st.sampled_from(self.saved))
        self.pl.load_state_dict(sd)
        self.micro, self.zeroed = micro, False

    # ---- failing calls: nothing may change ---------------------------------------------------
    @rule(seed=st.integers(0, 3), which=st.sampled_from(["text", "image"]))
    def loss_of_another_model(self, seed, which):
        mine, theirs = losses(MODEL, seed), losses(OTHER, seed)
        pair = (theirs[0], mine[1]) if which == "text" else (mine[0], theirs[1])
        self.fails(lambda: self.pl.backward(*pair, step=False))

    @rule(seed=st.integers(0, 3), kind=st.sampled_from(["detached", "vector", "number"]))
    def malformed_loss(self, seed, kind):
        text, image = losses(MODEL, seed)
        bad = {"detached": text.detach(), "vector": torch.stack([text, text]), "number": 1.0}[kind]
        self.fails(lambda: self.pl.backward(bad, image, step=False), ValueError)

    @rule(seed=st.integers(0, 3))
    def freed_graph(self, seed):
        text, image = losses(MODEL, seed)
        torch.autograd.grad(image, self.pl.layout.params, allow_unused=True)  # frees the image graph
        self.fails(lambda: self.pl.backward(text, image, step=False), RuntimeError)

    @rule(kind=st.sampled_from(["losses_shape", "micro_str", "missing", "buffers", "rule"]))
    def bad_checkpoint(self, kind):
        if self.zeroed:
            return  # state_dict() of a window whose .grad was reset is not this rule's subject
        sd = _bad_state(self.pl.state_dict(), kind)
        self.fails(lambda: self.pl.load_state_dict(sd), ValueError)

    @precondition(lambda self: self.micro == 0)
    @rule()
    def integrate_nothing(self):
        self.fails(self.pl.integrate_accumulated, RuntimeError)

    @precondition(lambda self: self.zeroed)
    @rule(seed=st.integers(0, 3))
    def backward_after_zero_grad(self, seed):
        self.fails(lambda: self.pl.backward(*losses(MODEL, seed), step=False), RuntimeError)

    @invariant()
    def counts_agree(self):
        if hasattr(self, "pl"):
            assert self.pl.micro_batches == self.micro


TestParetoLoRAMachine = ParetoLoRAMachine.TestCase
TestParetoLoRAMachine.settings = settings(max_examples=12, stateful_step_count=10, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow], derandomize=True)
