"""The digits world (app/demo/digits): split, VQ codebook, sequences, metrics, the study's statistics,
and a seconds-long end-to-end run whose files parse with a strict JSON parser."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pareto_lora.app import cli
from pareto_lora.app.demo.digits import data, experiment, metrics, report, study, tokens
from pareto_lora.app.demo.model import ModelConfig, build_base_model


@pytest.fixture(scope="module")
def splits():
    return tokens.split_digits(0)


@pytest.fixture(scope="module")
def codebook(splits):
    return tokens.train_codebook(splits["train"].images, 32, 2, seed=0)


@pytest.fixture(scope="module")
def classifier(splits):
    return metrics.train_classifier(splits["train"])


# ---- split ----------------------------------------------------------------------------------------
def test_split_is_stratified_disjoint_complete_and_deterministic(splits):
    from sklearn.datasets import load_digits

    d = load_digits()
    sizes = {k: len(s) for k, s in splits.items()}
    assert sizes == {"train": 1077, "val": 360, "test": 360} and sum(sizes.values()) == len(d.target)
    overall = np.bincount(d.target, minlength=10) / len(d.target)
    for s in splits.values():  # every digit's share within one image of the whole set's
        counts = np.bincount(s.labels, minlength=10)
        assert np.all(np.abs(counts - overall * len(s)) <= 1.0 + 1e-9), counts
    rows = {k: {v.tobytes() for v in s.images.reshape(len(s), -1)} for k, s in splits.items()}
    assert not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    again = tokens.split_digits(0)
    assert all(np.array_equal(again[k].images, splits[k].images) and np.array_equal(again[k].labels, splits[k].labels)
               for k in splits)
    other = tokens.split_digits(1)
    assert not np.array_equal(other["test"].labels, splits["test"].labels)
    with pytest.raises(ValueError, match="fractions"):
        tokens.split_digits(0, (0.6, 0.5))


# ---- codebook -------------------------------------------------------------------------------------
def test_codebook_is_trained_on_the_training_split_only(monkeypatch, splits):
    """prepare() hands k-means the training images, nothing else (the codebook never sees held-out digits)."""
    seen = []
    real = experiment.train_codebook

    def spy(images, *args, **kwargs):
        seen.append(np.asarray(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(experiment, "train_codebook", spy)
    cfg = experiment.DigitsConfig(**{**study.QUICK, "pretrain_steps": 1, "gen_samples": 1, "codebook_size": 8})
    setup = experiment.prepare(cfg)
    assert len(seen) == 1 and np.array_equal(seen[0], splits["train"].images)
    assert setup.codebook.size == 8 and 0 <= setup.base_info["classifier"]["real_test_acc"] <= 1


def test_codebook_is_deterministic_and_its_error_meets_the_protocol_bound(splits, codebook, classifier):
    again = tokens.train_codebook(splits["train"].images, 32, 2, seed=0)
    assert np.array_equal(again.centers, codebook.centers) and again.digest() == codebook.digest()
    rows = tokens.codebook_table(splits, (8, 32), 2, 0, classifier)
    real = metrics.classifier_accuracy(classifier, splits["val"].images, splits["val"].labels)
    small, used = rows
    assert used["val_rel_err"] < small["val_rel_err"]  # more codes, less error
    assert used["val_rel_err"] <= 0.10 and used["val_classifier_acc"] >= real - 0.02  # the size criterion
    assert study.codebook_choice([{**r, "real_val_acc": real} for r in rows]) == 32


def test_codebook_choice_takes_the_smallest_size_meeting_both_conditions():
    row = lambda k, err, acc: {"size": k, "val_rel_err": err, "val_classifier_acc": acc, "real_val_acc": 0.98}  # noqa: E731
    assert study.codebook_choice([row(8, 0.2, 0.98), row(16, 0.09, 0.95), row(32, 0.06, 0.97), row(64, 0.04, 0.98)]) == 32
    assert study.codebook_choice([row(8, 0.2, 0.9)]) is None


def test_decode_encode_shapes_values_and_round_trip(splits, codebook):
    imgs = splits["test"].images[:20]
    codes = codebook.encode(imgs)
    assert codes.shape == (20, 16) and codes.dtype == np.int64 and codes.min() >= 0 and codes.max() < 32
    dec = codebook.decode(codes)
    assert dec.shape == (20, 8, 8) and dec.min() >= 0 and dec.max() <= tokens.PIXEL_MAX
    assert np.array_equal(codebook.encode(dec), codes)  # a centre's nearest centre is itself
    patch = dec[0, 2:4, 4:6].reshape(-1)  # grid cell (1, 2) = code index 1 * 4 + 2
    assert np.array_equal(patch, codebook.centers[codes[0, 6]])
    assert np.mean((dec - imgs) ** 2) < np.mean((imgs - imgs.mean()) ** 2)
    with pytest.raises(ValueError, match="codes"):
        codebook.decode(np.full((1, 16), 32))
    with pytest.raises(ValueError, match="images"):
        codebook.encode(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="patch"):
        tokens.train_codebook(splits["train"].images, 8, patch=3)


# ---- sequences ------------------------------------------------------------------------------------
def test_both_kinds_of_sequence(splits, codebook):
    v = data.DigitsVocab(num_codes=32)
    world = data.make_world(2, v)
    split = data.TokenSplit.of(codebook, splits["train"])
    b = data.sample_batch(world, split, 8, torch.Generator().manual_seed(3))
    assert b.input_ids.shape == (8, v.seq_len) and torch.equal(b.image_token_mask, b.input_ids >= v.image_base)
    assert torch.equal(b.input_ids, data.sample_batch(world, split, 8, torch.Generator().manual_seed(3)).input_ids)
    codes_of = {tuple(c): int(l) for c, l in zip(split.codes.tolist(), split.labels.tolist())}
    for i, row in enumerate(b.input_ids.tolist()):
        assert row[0] == v.BOS and row[-1] == v.EOS
        digits = [t - v.digit_base for t in row if v.digit_base <= t < v.filler_base]
        assert len(digits) == 1  # one digit word per sequence
        if i < 4:  # generation: <bos> caption <boi> codes <eoi> <eos>
            assert row[v.caption_len + 1] == v.BOI and row[-2] == v.EOI
            image = row[v.caption_len + 2: v.caption_len + 2 + 16]
            assert tuple(row[1: 1 + v.caption_len]) in {tuple(v.digit_base + digits[0] if w == data.DIGIT_SLOT else w
                                                              for w in t) for t in world.captions}
        else:  # understanding: <bos> <boi> codes <eoi> question answer <eos>
            assert row[1] == v.BOI and row[18] == v.EOI
            image = row[2:18]
            words = row[19:-1]
            assert all(v.filler_base <= w < v.image_base for w in words[: v.question_len])
        assert codes_of[tuple(t - v.image_base for t in image)] == digits[0]  # the words name the image's digit
    rows, pos = data.answer_positions(b, v)
    assert rows.tolist() == [4, 5, 6, 7] and all(p >= 19 + v.question_len for p in pos.tolist())
    pre = data.make_world(1, v, digits=range(6))
    held = data.sample_batch(pre, split, 64, torch.Generator().manual_seed(0)).input_ids
    named = held[(held >= v.digit_base) & (held < v.filler_base)] - v.digit_base
    assert named.max() <= 5  # the pre-training world never shows 6..9
    assert not set(pre.captions) & set(world.captions)
    with pytest.raises(ValueError, match="batch_size"):
        data.sample_batch(world, split, 3, torch.Generator())
    with pytest.raises(ValueError, match="digits"):
        data.make_world(0, v, digits=(10,))


def test_eval_batches_cover_every_image_once_per_kind(splits, codebook):
    v = data.DigitsVocab(num_codes=32)
    world = data.make_world(2, v)
    test = data.TokenSplit.of(codebook, splits["test"])
    batches = data.eval_batches(world, test, seed=5, batch_size=100)
    ids = torch.cat([b.input_ids for b in batches])
    assert len(ids) == 2 * len(test.labels)
    assert int((ids[:, 1] == v.BOI).sum()) == len(test.labels)  # understanding rows
    prompts, asked = data.caption_prompts(world)
    assert prompts.shape == (80, v.caption_len + 2) and sorted(set(asked.tolist())) == list(range(10))
    assert (prompts[:, -1] == v.BOI).all()


# ---- metrics --------------------------------------------------------------------------------------
def test_understanding_hits_on_a_hand_made_case():
    v = data.DigitsVocab(num_codes=4)
    und = [v.BOS, v.BOI, *[v.image_base] * 16, v.EOI, v.filler_base, v.filler_base + 1, v.filler_base + 2,
           v.digit_base + 7, v.filler_base, v.EOS]
    gen = [v.BOS, v.filler_base, v.digit_base + 3, v.filler_base, v.filler_base, v.filler_base, v.BOI,
           *[v.image_base] * 16, v.EOI, v.EOS]
    ids = torch.tensor([gen, und, und])
    batch = data._batch(ids, v)
    logits = torch.zeros(3, ids.shape[1], v.size)
    logits[1, 21, v.digit_base + 7] = 5.0  # right answer (position 22 is predicted at 21)
    logits[2, 21, v.digit_base + 1] = 5.0  # wrong
    assert metrics.understanding_hits(batch, logits, v) == (1, 2)


class _FixedCodes(torch.nn.Module):
    """A stand-in model whose most likely next token is always the next code of one stored image."""

    def __init__(self, vocab, codes):
        super().__init__()
        self.vocab, self.codes = vocab, torch.as_tensor(codes)

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        done = 0 if past_key_values is None else past_key_values + 1
        logits = torch.zeros(*input_ids.shape, self.vocab.size)
        if done < len(self.codes):
            logits[:, -1, self.vocab.image_base + int(self.codes[done])] = 1.0
        return type("Out", (), {"logits": logits, "past_key_values": done})()


def test_generation_accuracy_on_a_model_that_always_draws_one_real_seven(splits, codebook, classifier):
    v = data.DigitsVocab(num_codes=32)
    world = data.make_world(2, v)
    test = splits["test"]
    seven = next(i for i in range(len(test)) if test.labels[i] == 7 and
                 classifier.predict(codebook.decode(codebook.encode(test.images[i: i + 1])).reshape(1, -1))[0] == 7)
    codes = codebook.encode(test.images[seven: seven + 1])[0]
    res = metrics.generation_accuracy(_FixedCodes(v, codes), world, codebook, classifier, "cpu", seed=0, samples=1,
                                      temperature=1e-4)
    assert res["gen_acc_greedy"] == pytest.approx(0.1) and res["gen_acc_sampled"] == pytest.approx(0.1)
    assert np.allclose(res["greedy_images"][7], codebook.decode(codes[None])[0], atol=1e-3)
    assert metrics.classifier_accuracy(classifier, test.images, test.labels) > 0.95
    with pytest.raises(ValueError, match="temperature"):
        metrics.generate_codes(_FixedCodes(v, codes), data.caption_prompts(world)[0], v, "cpu", temperature=-1)


def test_kv_cached_greedy_generation_equals_full_forwards():
    v = data.DigitsVocab(num_codes=8)
    world = data.make_world(2, v)
    model = build_base_model(ModelConfig(num_layers=2, hidden_size=32, intermediate_size=64), v.size, v.seq_len, 0).eval()
    prompts = data.caption_prompts(world)[0][:6]
    got = metrics.generate_codes(model, prompts, v, "cpu")
    ids = prompts
    with torch.no_grad():
        for _ in range(v.image_tokens):
            nxt = model(input_ids=ids).logits[:, -1, v.image_base: v.image_base + v.num_codes].argmax(-1)
            ids = torch.cat([ids, v.image_base + nxt[:, None]], 1)
    assert torch.equal(got, ids[:, prompts.shape[1]:] - v.image_base)


# ---- statistics -----------------------------------------------------------------------------------
def _run(rule, seed, text, image, gen, und=0.5):
    final = {"text": text, "image": image, "und_acc": und, "gen_acc_greedy": gen, "gen_acc_sampled": gen}
    rec = {"step": 1, "groups": {}, "layers": {"layer0": {"ratio": 2.0}, "layer1": {"ratio": float("nan")}}}
    return experiment.DigitsRun(rule, seed, 0.01, 10, final, [rec], 1.0, [[0], [1]])


def test_distances_to_the_curve_on_hand_made_points():
    runs = []
    for seed, noise in ((0, 0.0), (1, 0.01), (2, -0.01)):
        runs += [_run("sum", seed, 1.0, 2.0 + noise, 0.4), _run("w2", seed, 2.0, 1.0 + noise, 0.8),
                 _run("pareto_lora", seed, 1.5, 1.2 + noise, 0.5 + noise)]
    summary = report.summarize(runs)
    comp = report.compare(summary)["pareto_lora"]
    # curve at text 1.5: image 1.5 -> distance -0.3; gen 0.6 -> -0.1; at gen 0.5: text 1.25 -> +0.25
    assert comp["image_at_text"]["mean"] == pytest.approx(-0.3) and comp["image_at_text"]["word"] == "better"
    assert comp["gen_at_text"]["mean"] == pytest.approx(-0.1, abs=0.01) and comp["gen_at_text"]["word"] == "worse"
    assert comp["text_at_gen"]["mean"] == pytest.approx(0.25, abs=0.03) and comp["text_at_gen"]["place"] == "worse"
    assert comp["vs_sum_gen_acc_sampled"]["word"] == "better"
    assert summary["sum"]["ratio_median"] == 2.0  # the NaN ratio is left out
    lines = report.verdict(summary, report.compare(summary), {"classifier": {"real_test_acc": 0.99, "vq_test_acc": 0.98},
                                                               "finetune_world_test": {**runs[0].final}})
    assert any(ln.startswith("pareto_lora vs vanilla") and "BETTER" in ln for ln in lines)
    # the last line counts the printed intervals: 4 against vanilla and 3 distances, the good-side ones named
    good = sum(comp[k]["word"] == "better" for k in ("vs_sum_image", "vs_sum_text", "vs_sum_gen_acc_sampled", "vs_sum_und_acc",
                                                     "image_at_text", "gen_at_text", "text_at_gen"))
    assert lines[-1].startswith(f"Multiplicity: the comparisons above hold 7 paired 95% intervals, {good} of them on the good side")
    assert "pareto_lora" in report.format_table(summary, report.compare(summary))


@pytest.mark.parametrize("w2_image, detects", [((0.90, 0.91, 0.89), True), ((0.70, 1.20, 0.95), False)])
def test_the_power_check_reads_the_image_loss_of_w2_against_vanilla(w2_image, detects):
    """Issue 25: the digits world's power check is the shapes world's (verdict.power) on raw image loss."""
    from pareto_lora.app.demo import verdict

    runs = [r for seed in range(3) for r in (_run("sum", seed, 1.0, 1.0, 0.4), _run("w2", seed, 1.1, w2_image[seed], 0.5))]
    comparison = report.compare(report.summarize(runs))
    check = verdict.power(comparison, key="vs_sum_image", measure="image loss")
    assert check["detects"] is detects and check["interval"] is comparison["w2"]["vs_sum_image"]
    assert check["line"].startswith(f"Power: w=2 minus w=1 (vanilla), paired image loss {sum(w2_image) / 3 - 1:+.3f} [")
    assert ("this run can tell w=2 from w=1" in check["line"]) is detects
    assert ("cannot tell w=2 from w=1 apart" in check["line"]) is not detects
    # generation accuracy (w2 draws 0.5, 0.3, 0.55 against vanilla's 0.4): +0.05, an interval across 0
    runs = [r for seed, g in enumerate((0.5, 0.3, 0.55)) for r in (_run("sum", seed, 1.0, 1.0, 0.4),
                                                                   _run("w2", seed, 1.1, w2_image[seed], g))]
    gen = verdict.power(report.compare(report.summarize(runs)), key="vs_sum_gen_acc_sampled",
                        measure="generation accuracy (sampled)",
                        consequence="its verdicts of 'no detectable difference' in generation accuracy say little")
    assert gen["interval"]["mean"] == pytest.approx(0.05) and gen["detects"] is False
    assert gen["line"].startswith("Power: w=2 minus w=1 (vanilla), paired generation accuracy (sampled) +0.050 [")
    assert gen["line"].endswith("(the interval covers 0), so its verdicts of 'no detectable difference' in generation "
                                "accuracy say little.")


def test_ratio_quantiles():
    q = study.ratio_quantiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert q["q50"] == 3.0 and q["q25"] == 2.0 and q["share_beyond_10x"] == pytest.approx(0.2)
    assert study.ratio_quantiles([1.0, 2.0])["q50"] == 1.5
    assert study.ratio_quantiles([]) == {}


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="rules"):
        experiment.DigitsConfig(rules=("nope",)).check()
    with pytest.raises(ValueError, match="batch_size"):
        experiment.DigitsConfig(batch_size=7).check()
    with pytest.raises(ValueError, match="loss_norm"):
        experiment.DigitsConfig(loss_norm="sum").check()
    with pytest.raises(ValueError, match="image_scale"):
        experiment.DigitsConfig(image_scale=0.0).check()
    with pytest.raises(ValueError, match="lrs"):
        experiment.DigitsConfig(lrs=(1e-3, -1.0)).check()
    with pytest.raises(ValueError, match="pretrain_digits"):
        experiment.DigitsConfig(pretrain_digits=tuple(range(10))).check()
    with pytest.raises(ValueError, match="arch"):
        experiment.DigitsConfig(model=ModelConfig(arch="chameleon")).check()
    assert experiment.DigitsConfig(**study.STRONG).key() != experiment.DigitsConfig(**study.FULL).key()


# ---- end to end -----------------------------------------------------------------------------------
def _strict(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name} in {path}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def test_quick_end_to_end_run_writes_strict_json_and_figures(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["demo", "--world", "digits", "--quick", "--rules", "text_only,image_only,sum,w2,pareto_lora", "--steps", "2",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "== digits: lr 0.01" in printed and "Time:" in printed and "load average" in printed
    doc = _strict(out / "results.json")
    s = doc["settings"]["digits"]
    # the setting's first result line is its power check (issue 25), stored beside the verdict
    lines = printed.splitlines()
    at = lines.index("== digits: lr 0.01")
    assert lines[at + 1] == s["power"]["line"] and lines[at + 2] == s["power_generation"]["line"]
    assert s["power"]["line"].startswith("Power: w=2 minus w=1 (vanilla), paired image loss ")
    assert s["power_generation"]["line"].startswith("Power: w=2 minus w=1 (vanilla), paired generation accuracy (sampled) ")
    assert s["power"]["detects"] in (True, False) and s["power"]["interval"]["n"] == 2
    assert set(s["summary"]) == {"text_only", "image_only", "sum", "w2", "pareto_lora"}
    assert all(math.isfinite(r["final"]["text"]) for r in s["runs"]) and len(s["runs"]) == 10
    assert doc["codebook"]["used"] == 32 and doc["machine_start"]["cpu"]
    for name in ("samples.png", "tradeoff.png", "ratios.png"):
        assert (out / name).stat().st_size > 1000
    for f in os.listdir(out / "digits" / "runs"):
        run = json.loads((out / "digits" / "runs" / f).read_text())
        assert run["steps"] == 2 and len(run["records"]) == 2
    # a second call reloads every run instead of training again
    assert cli.main(args) == 0
    assert _strict(out / "results.json")["settings"]["digits"]["timings"]["runs_loaded"] == 10


@pytest.mark.parametrize("args, message", [
    (["--optimizer", "sgd"], "--world digits: --optimizer sgd belong to the shapes world"),
    (["--arch", "chameleon"], "--arch belong to the shapes world"),
    (["--num-groups", "9"], "num_groups: expected 1..3"),
    (["--rules", "sum,nope"], "unknown rule(s) 'nope'"),
])
def test_digits_flags_are_checked_up_front(args, message):
    res = subprocess.run([sys.executable, "-m", "pareto_lora", "demo", "--world", "digits", "--quick", *args],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.startswith("pareto-lora demo: error")]) == 1
