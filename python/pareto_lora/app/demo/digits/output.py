"""Runs the digits study's settings (two processes under ``--full``) and writes what they found.

Writes into the output folder: ``results.json`` (strict JSON: configs, machine, load, codebook table,
tuning, every summary and interval, the verdicts, the ratio quantiles, the runs without their
per-step records, which stay in ``<setting>/runs/*.json``), ``samples.png`` (greedy digits per
method, seed 0; real and VQ-reconstructed digits on top), ``tradeoff.png`` per setting and
``ratios.png``; prints per setting its power checks first (verdict.power: can its seeds tell w=2 from
w=1 in image loss, and in generation accuracy?), then its table and verdict; then the time and the
machine.
"""

from __future__ import annotations

import os
import platform
import time

__all__ = ["machine", "run_digits_demo"]


def machine() -> dict:
    """CPU model, the package's CPU build, cores, load average and the versions in use."""
    import torch

    from ...env import cpu_model, package_versions

    model = cpu_model()
    try:
        from pareto_lora import _C

        build = _C.cpu_capability()
    except (ImportError, AttributeError, ValueError):
        build = "no compiled extension"
    return {"cpu": model, "cpu_build": build, "cpu_count": os.cpu_count(), "load_avg": list(os.getloadavg()),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **package_versions()}


def _shapes_ratios(seeds, out_dir: str) -> dict:
    """The shapes world's vanilla runs (the shapes study's config, its run files) and their ratios."""
    from ..experiment import DemoConfig, run_experiment
    from .report import ratio_values
    from .study import ratio_quantiles

    result = run_experiment(DemoConfig(rules=("sum",), seeds=tuple(seeds)), progress=False,
                            runs_dir=os.path.join(out_dir, "runs"))
    values = [v for r in result["runs"] for v in ratio_values(r.records)]
    return {"name": "shapes", "vanilla_ratios": values, "ratio_quantiles": ratio_quantiles(values)}


def _codebook_table(cfg) -> dict:
    from .metrics import classifier_accuracy, train_classifier
    from .study import CODEBOOK_SIZES, codebook_choice
    from .tokens import codebook_table, split_digits

    splits = split_digits(cfg.split_seed)
    clf = train_classifier(splits["train"])
    real = classifier_accuracy(clf, splits["val"].images, splits["val"].labels)
    rows = [{**r, "real_val_acc": real} for r in codebook_table(splits, CODEBOOK_SIZES, cfg.patch, cfg.split_seed, clf)]
    return {"rows": rows, "chosen_by_criterion": codebook_choice(rows), "used": cfg.codebook_size}


def _work(task):
    """One process's job (top level, so that a spawned worker can import it)."""
    kind, name, cfg, out_dir = task
    if kind == "shapes":
        return _shapes_ratios(cfg, out_dir)
    from .study import run_setting

    return run_setting(name, cfg, out_dir, echo=lambda line: print(line, flush=True))


def run_digits_demo(settings: list[tuple[str, object]], out_dir: str, echo=print, shapes_seeds=None) -> dict:
    """Every setting (name, DigitsConfig) into ``out_dir/<name>/``; with two or more tasks they run in
    parallel processes, one per core. ``shapes_seeds``: also the shapes world's vanilla ratios."""
    from ..report import _finite, write_json
    from . import plots

    t0 = time.perf_counter()
    start = machine()
    os.makedirs(out_dir, exist_ok=True)
    echo(f"Digits study into {out_dir}: settings {', '.join(n for n, _ in settings)}; machine {start['cpu']} "
         f"({start['cpu_build']} build, {start['cpu_count']} cores), load average {start['load_avg'][0]:.2f}, {start['date_utc']}")
    tasks = [("digits", n, c, os.path.join(out_dir, n)) for n, c in settings]
    if shapes_seeds:  # second, so that the first setting has cached the shared base when the next one starts
        tasks.insert(1, ("shapes", "shapes", tuple(shapes_seeds), os.path.join(out_dir, "shapes")))
    if len(tasks) > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_work, tasks))
    else:
        results = [_work(tasks[0])]
    done = {r["name"]: r for r in results}
    main_cfg = settings[0][1]
    doc = {"machine_start": start, "codebook": _codebook_table(main_cfg), "settings": {}, "files": {}}
    dists = {}
    for name, _ in settings:
        r = done[name]
        dists[name] = r.pop("vanilla_ratios")
        sg, ss = r.pop("samples_greedy"), r.pop("samples_sampled")
        doc["settings"][name] = r
        tag = "" if name == settings[0][0] else f"_{name.split('-', 1)[-1]}"
        doc["files"][f"tradeoff{tag}"] = plots.plot_tradeoff(
            r["summary"], os.path.join(out_dir, f"tradeoff{tag}.png"), f"{name}: means over seeds {r['config']['seeds']}")
        if name == settings[0][0]:
            doc["files"]["samples"] = _samples_figure(main_cfg, sg, ss, os.path.join(out_dir, "samples.png"))
    if "shapes" in done:
        dists = {"shapes": done["shapes"]["vanilla_ratios"], **dists}
        doc["shapes_ratio_quantiles"] = done["shapes"]["ratio_quantiles"]
    doc["files"]["ratios"] = plots.plot_ratios(dists, os.path.join(out_dir, "ratios.png"))
    doc["machine_end"] = machine()
    doc["total_s"] = time.perf_counter() - t0
    doc["files"]["results"] = os.path.join(out_dir, "results.json")
    write_json(_finite(doc), doc["files"]["results"])
    for name, _ in settings:
        r = doc["settings"][name]
        echo("")
        echo(f"== {name}: lr {r['config']['lr']:g}")
        echo(r["power"]["line"])  # first: whether the rest can see a difference of the size that matters
        echo(r["power_generation"]["line"])
        echo("Held-out losses (nats/token), understanding and generation accuracy (% greedy / sampled), "
             "paired 95% intervals:")
        echo(r["table"])
        for line in r["verdict"]:
            echo(line)
    for name, q in [("shapes", doc.get("shapes_ratio_quantiles"))] + [(n, doc["settings"][n]["ratio_quantiles"]) for n, _ in settings]:
        if q:
            echo(f"{name}: vanilla per-layer ||g_text||/||g_image|| median {q['q50']:.3g} (5-95 %: {q['q5']:.3g}-{q['q95']:.3g}), "
                 f"{q['share_beyond_10x']:.0%} beyond 10x either way")
    echo(f"Wrote {len(doc['files'])} files to {out_dir}. Time: {doc['total_s']:.1f}s on {start['cpu']} "
         f"({start['cpu_count']} cores); load average {start['load_avg'][0]:.2f} at the start, "
         f"{doc['machine_end']['load_avg'][0]:.2f} at the end.")
    return doc


def _samples_figure(cfg, greedy: dict, sampled: dict, path: str) -> str:
    """Real and VQ-reconstructed held-out digits, then each method's greedy digits (seed 0)."""
    from . import plots
    from .tokens import split_digits, train_codebook

    splits = split_digits(cfg.split_seed)
    test = splits["test"]
    first = [int((test.labels == d).nonzero()[0][0]) for d in range(10)]
    cb = train_codebook(splits["train"].images, cfg.codebook_size, cfg.patch, cfg.split_seed)
    rows = {"real (held-out)": test.images[first], "VQ reconstruction": cb.decode(cb.encode(test.images[first]))}
    rows.update({f"{k} (greedy)": v for k, v in greedy.items() if len(v) == 10})
    rows.update({f"{k} (sampled)": sampled[k] for k in ("sum", "pareto_lora") if len(sampled.get(k, ())) == 10})
    return plots.plot_samples(rows, path, "generated digits 0-9 (first caption template, seed %d)" % cfg.seeds[0])

