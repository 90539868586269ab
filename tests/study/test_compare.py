"""pareto_lora.study's statistics against hand-computed values: vs vanilla, the curve distances
(inside, extrapolated, outside), the power line, one seed, failed runs."""

import json
import math

import pytest

from pareto_lora.study import Result

T975_2 = 4.303  # t_{0.975} with 2 degrees of freedom (three seeds)


def _rec(rule, weight, seed, text, image, **extra):
    return {"rule": rule, "weight": weight, "seed": seed, "metrics": {"text": text, "image": image, **extra}}


def _curve(seeds=(0, 1, 2), shift=(0.0, 0.01, -0.01)):
    """w=1 at (1.0, 2.0), w=2 at (1.2, 1.6), per seed shifted by a common offset (paired noise)."""
    return [r for s, d in zip(seeds, shift) for r in (_rec(None, 1, s, 1.0 + d, 2.0 + d), _rec(None, 2, s, 1.2 + d, 1.6 + d))]


def test_vs_vanilla_by_hand_with_directions():
    rule = [_rec("upgrad", None, s, 1.0 + d + 0.2 + 0.05 * s, 2.0 + d, acc=0.7 + 0.05 * s)
            for s, d in zip((0, 1, 2), (0.0, 0.01, -0.01))]
    curve = [{**r, "metrics": {**r["metrics"], "acc": 0.5}} for r in _curve()]
    res = Result.from_records(curve + rule, higher_is_better={"acc"})
    v = res.comparisons["upgrad"]["vs_vanilla"]
    half = T975_2 * 0.05 / math.sqrt(3)  # diffs 0.2, 0.25, 0.3: mean 0.25, sd 0.05
    assert v["text"]["interval"].mean == pytest.approx(0.25)
    assert (v["text"]["interval"].low, v["text"]["interval"].high) == (pytest.approx(0.25 - half), pytest.approx(0.25 + half))
    assert v["text"]["word"] == "worse"  # text is lower-is-better
    assert v["acc"]["word"] == "better"  # the same differences on a higher-is-better metric
    assert v["image"]["word"] == "no detectable difference" and v["image"]["interval"].mean == pytest.approx(0.0)
    assert v["text"]["seeds"] == [0, 1, 2]


def test_curve_distance_inside_by_hand():
    # the rule at text 1.1 (mid-segment): curve image 1.8; rule image 1.7 + e_s -> distance -0.1 + e_s
    e = (0.0, 0.02, -0.01)
    rule = [_rec("pareto_lora", None, s, 1.1 + d, 1.7 + d + e[s]) for s, d in zip((0, 1, 2), (0.0, 0.01, -0.01))]
    res = Result.from_records(_curve() + rule)
    c = res.comparisons["pareto_lora"]["curve_at_equal_text"]
    dists = [-0.1 + x for x in e]
    assert list(c["per_seed"].values()) == pytest.approx(dists)
    assert all(c["inside"].values()) and c["place"] == "below"
    sd = math.sqrt(sum((x - sum(dists) / 3) ** 2 for x in dists) / 2)
    assert c["interval"].high == pytest.approx(sum(dists) / 3 + T975_2 * sd / math.sqrt(3))
    # equal image: in the (image, text) plane the curve joins (2.0, 1.0) and (1.6, 1.2); at image 1.7 + e
    # its text is 1.0 + (1.7 + e - 2.0) * (0.2 / -0.4) = 1.15 - e / 2, so the distance is -0.05 + e / 2
    ci = res.comparisons["pareto_lora"]["curve_at_equal_image"]
    assert list(ci["per_seed"].values()) == pytest.approx([-0.05 + x / 2 for x in e])
    report = res.report()
    assert "vs reweighting curve at equal text: image" in report and "BELOW the curve" in report
    assert "LEFT of the curve" in report and "extrapolated" not in report


def test_curve_distance_extrapolated_in_some_seeds_is_flagged():
    # seed 2's rule lies beyond w=2's text (1.3 > 1.2 - 0.01): extrapolated from the end segment, flagged
    texts = {0: 1.1, 1: 1.15, 2: 1.3}
    rule = [_rec("pareto_lora", None, s, texts[s] + d, 1.7 + d) for s, d in zip((0, 1, 2), (0.0, 0.01, -0.01))]
    c = Result.from_records(_curve() + rule).comparisons["pareto_lora"]["curve_at_equal_text"]
    assert c["inside"] == {0: True, 1: True, 2: False}
    assert c["per_seed"][2] == pytest.approx(1.7 - (2.0 - 2.0 * (1.3 - 1.0)))  # the line through both points
    report = Result.from_records(_curve() + rule).report()
    assert "extrapolated beyond the curve's text range in 1 of 3 seeds" in report


def test_curve_distance_outside_every_seed_has_no_verdict():
    rule = [_rec("pareto_lora", None, s, 0.5, 1.0) for s in (0, 1, 2)]
    res = Result.from_records(_curve() + rule)
    assert res.comparisons["pareto_lora"]["curve_at_equal_text"]["place"] == "outside"
    assert "OUTSIDE the curve's text range in every seed, so no comparison" in res.report()


def test_power_line_detects_and_does_not():
    res = Result.from_records(_curve() + [_rec("upgrad", None, s, 1.0, 2.0) for s in (0, 1, 2)])
    assert res.power["detects"] is True and res.power["weight"] == 2.0
    assert res.report().splitlines()[0].startswith("Power: w=2 minus w=1 (vanilla), paired image -0.400 [")
    noisy = [_rec(None, 1, s, 1.0, 2.0) for s in (0, 1, 2)] + [_rec(None, 2, s, 1.0, 2.0 + d) for s, d in
                                                              zip((0, 1, 2), (-0.3, 0.2, 0.05))]
    res = Result.from_records(noisy + [_rec("upgrad", None, s, 1.0, 2.0) for s in (0, 1, 2)])
    assert res.power["detects"] is False
    assert "cannot tell w=2 from w=1 apart (the interval covers 0)" in res.power["line"]
    assert "say little" in res.power["line"]


def test_power_uses_the_smallest_weight_above_one_without_two():
    recs = [_rec(None, w, s, 1.0, 2.0 - 0.1 * w + 0.01 * s * s) for w in (1, 1.5, 4) for s in (0, 1, 2)]
    res = Result.from_records(recs + [_rec("upgrad", None, s, 1.0, 2.0) for s in (0, 1, 2)])
    assert res.power["weight"] == 1.5 and res.power["line"].startswith("Power: w=1.5 minus w=1")
    only_one = Result.from_records([_rec(None, 1, s, 1.0, 2.0) for s in (0, 1)] + [_rec("upgrad", None, s, 1, 2) for s in (0, 1)])
    assert only_one.power["detects"] is None and "not checked" in only_one.power["line"]
    assert "none (it needs two or more weights)" in only_one.report()


def test_one_seed_has_no_interval_and_says_so():
    res = Result.from_records([_rec(None, 1, 7, 1.0, 2.0), _rec(None, 2, 7, 1.2, 1.6), _rec("upgrad", None, 7, 1.1, 1.0)])
    v = res.comparisons["upgrad"]["vs_vanilla"]["image"]
    assert v["interval"].n == 1 and v["word"] == "no detectable difference"
    assert "One seed: there are no intervals" in res.report()
    assert "needs two or more seeds" in res.power["line"]
    json.dumps(res.as_dict(), allow_nan=False)  # NaN interval ends become None


def test_failed_runs_are_named_and_left_out_of_their_pairs():
    rule = [_rec("upgrad", None, s, 1.1, float("nan") if s == 1 else 1.7) for s in (0, 1, 2)]
    res = Result.from_records(_curve() + rule)
    assert res.comparisons["upgrad"]["vs_vanilla"]["image"]["seeds"] == [0, 2]
    assert list(res.comparisons["upgrad"]["curve_at_equal_text"]["per_seed"]) == [0, 2]
    report = res.report()
    assert "Failed runs" in report and "upgrad seed 1 (image = nan)" in report and "1 failed" in report
    d = res.as_dict()
    json.dumps(d, allow_nan=False)
    (failed,) = [r for r in d["records"] if r["status"] == "failed"]
    assert (failed["method"], failed["seed"], failed["metrics"]["image"]) == ("upgrad", 1, "nan")
    # the JSON form reads back to the same result ("nan" strings included)
    assert Result.from_records(d["records"]).report() == report
    # a failed vanilla run drops its seed from every comparison with vanilla
    bad_vanilla = [r if (r["weight"], r["seed"]) != (1, 0) else _rec(None, 1, 0, math.inf, 2.0) for r in _curve()]
    res = Result.from_records(bad_vanilla + rule)
    assert res.comparisons["upgrad"]["vs_vanilla"]["text"]["seeds"] == [2]
    assert res.power["interval"].n == 2


def test_missing_runs_are_reported_and_the_record_order_does_not_matter():
    recs = _curve() + [_rec("upgrad", None, s, 1.1, 1.7) for s in (0, 1)]
    recs_full = recs + [_rec("upgrad", None, 2, 1.1, 1.7)]
    res = Result.from_records(recs_full)
    assert Result.from_records(list(reversed(recs_full))).report() == res.report()
    assert res.as_dict() == Result.from_records(list(reversed(recs_full))).as_dict()
    assert not res.missing
    partial = Result.from_records(recs)
    assert [(m.name, s) for m, s in partial.missing] == [("upgrad", 2)]
    assert "Not run yet (the study is incomplete" in partial.report() and "upgrad seed 2" in partial.report()


def test_a_rules_record_may_leave_out_its_weight():
    rule = [{"rule": "upgrad", "seed": s, "metrics": {"text": 1.1, "image": 1.7}} for s in (0, 1, 2)]
    with_weight = [{**r, "weight": None} for r in rule]
    assert Result.from_records(_curve() + rule).as_dict() == Result.from_records(_curve() + with_weight).as_dict()


def test_the_report_ends_with_how_many_intervals_it_holds_and_what_chance_gives():
    # the rule of test_curve_distance_inside_by_hand: below and left of the curve (two good-side
    # intervals) and vanilla's text/image (two more intervals, no detectable difference)
    e = (0.0, 0.02, -0.01)
    rule = [_rec("pareto_lora", None, s, 1.1 + d, 1.7 + d + e[s]) for s, d in zip((0, 1, 2), (0.0, 0.01, -0.01))]
    res = Result.from_records(_curve() + rule)
    m = res.as_dict()["multiplicity"]
    v = res.comparisons["pareto_lora"]["vs_vanilla"]
    good_vs_vanilla = sum(row["word"] == "better" for row in v.values())
    assert m == {"intervals": 4, "good_side": 2 + good_vs_vanilla, "by_chance": pytest.approx(0.1)}
    last = res.report().splitlines()[-1]
    assert last.startswith(f"Multiplicity: the comparisons above hold 4 paired 95% intervals, {m['good_side']} of them")
    assert "about 0.1 would land there by chance" in last and "fresh seeds" in last
    # one seed: no intervals, no multiplicity line
    one = Result.from_records([r for r in _curve() + rule if r["seed"] == 0])
    assert one.as_dict()["multiplicity"]["intervals"] == 0
    assert not one.report().splitlines()[-1].startswith("Multiplicity")
