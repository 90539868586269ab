"""Three objectives in the digits world (app/demo/digits/three.py, three_study.py): the split of the
targets, the comparisons at the grid's own weights, and a seconds-long end-to-end run."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import pareto_lora
from pareto_lora.app import cli
from pareto_lora.app.demo.digits import data, three, three_study, tokens
from pareto_lora.study.stats import t_quantile
from test_digits import _strict


@pytest.fixture(scope="module")
def batch():
    splits = tokens.split_digits(0)
    codebook = tokens.train_codebook(splits["train"].images, 32, 2, seed=0)
    world = data.make_world(2, data.DigitsVocab())
    split = data.TokenSplit.of(codebook, splits["train"])
    return data.sample_batch(world, split, 8, torch.Generator().manual_seed(0)), world.vocab


def test_the_three_masks_split_the_targets_as_the_archs_split_does(batch):
    b, v = batch
    masks = three.objective_masks(b, v)
    target = b.labels[:, 1:] != -100
    stacked = torch.stack([masks[k] for k in three.OBJECTIVES])
    assert torch.equal(stacked.sum(0), target.long())  # disjoint, and every target in one of them
    assert torch.equal(masks["generation"], b.image_token_mask[:, 1:] & target)
    und_rows = b.input_ids[:, 1] == v.BOI
    assert not masks["understanding"][~und_rows].any()  # generation sequences have no understanding target
    rows, pos = data.answer_positions(b, v)
    assert masks["understanding"][rows, pos - 1].all()  # the answer's digit word is an understanding target
    for r in torch.nonzero(und_rows).flatten():  # <boi>, the first target, comes before the image: text
        assert masks["text"][r, 0] and not masks["understanding"][r, : 1 + v.image_tokens].any()


def test_the_losses_are_the_two_objective_losses_split(batch):
    b, v = batch
    logits = torch.randn(*b.input_ids.shape, v.size, generator=torch.Generator().manual_seed(1))
    losses = three.objective_losses(logits, b, v)
    masks = three.objective_masks(b, v)
    text2, image2 = pareto_lora.modality_losses(logits, b.labels, image_token_mask=b.image_token_mask)
    n_t, n_u = int(masks["text"].sum()), int(masks["understanding"].sum())
    torch.testing.assert_close(losses["generation"], image2)
    torch.testing.assert_close((n_t * losses["text"] + n_u * losses["understanding"]) / (n_t + n_u), text2)


def test_grid_names_and_loss_weights():
    assert len(three.GRID) == 16 and three.GRID["sum"] == (1.0, 1.0) and three.GRID["u0.5g4"] == (0.5, 4.0)
    assert three.loss_weights3("u2g0.5") == (1.0, 2.0, 0.5) and three.loss_weights3("upgrad") == (1.0, 1.0, 1.0)
    assert set(three.RULES) <= set(pareto_lora.multi.weightings.K_RULES) and not set(three.RULES) & set(three.GRID)
    with pytest.raises(ValueError, match="rule: expected one of"):
        three.finetune3(None, None, "pareto_lora", 0)
    with pytest.raises(ValueError, match="unknown method"):
        three_study.check_methods(("sum", "pareto_lora"))


def _summary(per_method):
    """summary as summarize3 makes it, from method -> (text, und, gen) per seed."""
    out = {}
    for name, rows in per_method.items():
        seeds = list(range(len(rows)))
        per_seed = {m: {k: rows[k][i] for k in seeds} for i, m in enumerate(three_study.LOSSES)}
        per_seed.update({m: {k: 0.5 for k in seeds} for m in ("und_acc", "gen_acc_greedy", "gen_acc_sampled")})
        out[name] = {"seeds": seeds, "per_seed": per_seed, "mean": {}, "diverged": [], "seconds": 0.0}
    return out


def test_the_rule_is_compared_at_each_points_own_weights_with_simultaneous_intervals():
    noise = [0.01, -0.02, 0.015, -0.005, 0.0]
    grid = {"sum": [(1.0, 1.0, 1.0)] * 5, "u1g2": [(1.1, 1.0, 0.9)] * 5}
    # the rule: the same text and understanding as u1g2, generation 0.3 lower (with noise) -> better
    # than u1g2 at u1g2's weights (1 + 1*1.0 + 2*0.6 against 1.1 + 1.0 + 1.8)
    rule = [(1.1, 1.0, 0.6 + e) for e in noise]
    summary = _summary({**{k: [tuple(x) for x in v] for k, v in grid.items()}, "upgrad": rule})
    c = three_study.compare3(summary)
    assert "at_grid" not in c["u1g2"] and c["upgrad"]["simultaneous_level"] == pytest.approx(1 - 0.05 / 2)
    at = c["upgrad"]["at_grid"]
    diffs = [(1.1 + 1.0 + 2 * (0.6 + e)) - (1.1 + 1.0 + 2 * 0.9) for e in noise]
    assert at["u1g2"]["single"]["mean"] == pytest.approx(sum(diffs) / 5)
    sd = (sum((d - sum(diffs) / 5) ** 2 for d in diffs) / 4) ** 0.5
    half = t_quantile(1 - 0.05 / 2, 4) * sd / math.sqrt(5)
    assert at["u1g2"]["simultaneous"]["high"] == pytest.approx(sum(diffs) / 5 + half)
    assert at["u1g2"]["simultaneous"]["word"] == "better"
    lines = three_study.format3({k: {**s, "mean": dict.fromkeys(three_study.METRICS3, 0.0)} for k, s in summary.items()}, c)
    assert any(ln.startswith("upgrad at each fixed weighting's own objective (2 points") and "BETTER than sum, u1g2;" in ln
               for ln in lines)


def test_every_rule_against_one_fixed_weighting_at_all_sixteen_weightings():
    seeds = 4
    base = {"sum": [(1.0, 1.0, 1.0)] * seeds, "u1g2": [(1.0, 1.0, 0.8)] * seeds, "u2g1": [(1.2, 0.9, 1.1)] * seeds}
    rule = [(1.0 + e, 1.0 - e, 0.8 + 0.5 * e) for e in (0.01, -0.01, 0.02, 0.0)]  # u1g2 up to noise
    summary = _summary({**base, "upgrad": rule})
    # u1g2 has the lowest mean S_P at most of the 16 weightings: the best point on these seeds
    assert three_study.best_point(summary) == "u1g2"
    # u2g1 is not the best way to its own objective: sum and u1g2 are below it at its weights
    assert three_study.compare3(summary)["u2g1"]["beaten_at_own_weights_by"] == ["sum", "u1g2"]
    c = three_study.compare3(summary)["upgrad"]["versus"]
    assert c["point"] == "u1g2" and not c["named"] and set(c["at"]) == set(three.GRID)
    assert c["level"] == pytest.approx(1 - 0.05 / 16)
    u, g = three.GRID["u4g0.5"]
    diffs = [(r[0] + u * r[1] + g * r[2]) - (1.0 + u * 1.0 + g * 0.8) for r in rule]
    assert c["at"]["u4g0.5"]["mean"] == pytest.approx(sum(diffs) / seeds)
    named = three_study.compare3(summary, "u2g1")["upgrad"]["versus"]
    assert named["point"] == "u2g1" and named["named"]
    assert named["image"]["mean"] == pytest.approx(sum(0.8 + 0.5 * e - 1.1 for e in (0.01, -0.01, 0.02, 0.0)) / seeds)
    line = three_study._versus_line("upgrad", named)
    assert line.startswith("upgrad against u2g1 (named in advance): ") and "at all 16 weightings" in line
    for bad in ("upgrad", "u4g4", "nope"):  # not a grid point, or one that was not run
        with pytest.raises(ValueError, match="versus: expected a grid point among the methods run"):
            three_study.compare3(summary, bad)


def test_quick_end_to_end_run(tmp_path, capsys):
    out = tmp_path / "three"
    args = ["demo", "--world", "digits", "--objectives", "3", "--quick", "--steps", "2", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    at = printed.index("== three objectives: lr 0.01, seeds [0, 1]")
    assert printed[at + 1].startswith("Power: u1g2 minus sum, paired generation loss ")
    assert printed[at + 2].startswith("Power: u2g1 minus sum, paired understanding loss ")

    doc = _strict(out / "results.json")
    assert set(doc["summary"]) == set(three_study.QUICK3_METHODS) and len(doc["runs"]) == 10
    assert all(math.isfinite(r["final"]["understanding"]) for r in doc["runs"])
    assert set(doc["comparison"]["upgrad"]["at_grid"]) == {"sum", "u1g2", "u2g1"}
    assert doc["comparison"]["upgrad"]["versus"]["point"] in ("sum", "u1g2", "u2g1")  # the best, chosen on these seeds
    assert any(ln.startswith("upgrad against ") and "exploratory" in ln for ln in printed)
    for f in os.listdir(out / "runs"):
        run = json.loads((out / "runs" / f).read_text())
        assert f.startswith("k3-") and run["steps"] == 2 and len(run["records"]) == 2
    assert (out / "three.png").stat().st_size > 1000
    assert cli.main(args) == 0  # a second call loads every run
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["timings"]["runs_loaded"] == 10


@pytest.mark.parametrize("args, message", [
    (["--world", "digits", "--objectives", "3", "--full"], "--objectives 3: expected without --full"),
    (["--world", "digits", "--objectives", "3", "--rules", "sum,pareto_lora"], "unknown method(s) 'pareto_lora'"),
    (["--world", "digits", "--rules", "sum,u2g4"], "unknown rule(s) 'u2g4'"),
    (["--objectives", "3"], "--objectives 3: expected --world digits"),
    (["--world", "digits", "--objectives", "4"], "invalid choice: 4"),
    (["--world", "digits", "--objectives", "3", "--versus", "u4g4"], "--versus: expected a grid point among the methods"),
    (["--world", "digits", "--versus", "u1g2"], "--versus: expected --objectives 3"),
    (["--world", "digits", "--objectives", "3", "--tau", "0.7"], "--tau: expected without --objectives 3"),
])
def test_three_objective_flags_are_checked_up_front(args, message):
    quick = [] if "--full" in args else ["--quick"]
    res = subprocess.run([sys.executable, "-m", "pareto_lora", "demo", *quick, *args],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("pareto-lora demo: error")]) == 1
