"""The ``pareto-lora`` command (also ``python -m pareto_lora``): demo, study, bench, info.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

__all__ = ["main", "build_parser"]

from .cli_args import (  # noqa: F401  (the argument types, also used by the tests as cli._name)
    _rules,
    _seeds,
    _positive_int,
    _positive_float,
    _float_list,
    _int_list,
    _dtypes,
    _device,
    _writable_folder,
    _check_bench_sizes,
)

# ---- subcommands --------------------------------------------------------------------------------
def _missing_extra(command: str, modules: tuple[str, ...]) -> bool:
    """True (after one line on stderr) when an optional extra that `command` needs is not installed."""
    from .env import install_hint, missing_modules

    missing = missing_modules(modules)
    if missing:
        print(f"pareto-lora {command}: expected {', '.join(missing)} installed (the 'demo' extra): "
              f"{install_hint('demo')}", file=sys.stderr)
    return bool(missing)


def _cmd_demo(args, parser) -> int:
    if _missing_extra("demo", ("matplotlib", "tqdm")):
        return 2
    from .demo import DEFAULT, FULL, QUICK, DemoConfig
    from .demo import run_demo

    device = _device(parser, args.device)
    if args.quick and args.full:
        parser.error("--quick and --full: expected at most one of them")
    if args.world == "digits":
        return _cmd_demo_digits(args, parser, device)
    if args.objectives != 2:
        parser.error("--objectives 3: expected --world digits (the shapes world has two objectives)")
    if args.versus is not None:
        parser.error("--versus: expected --world digits --objectives 3")
    cfg = DemoConfig(**(QUICK if args.quick else FULL if args.full else DEFAULT))
    sgd = args.optimizer == "sgd"
    if sgd and args.lr is not None:
        parser.error("--lr: the SGD study tunes the learning rate per method; give its grid with --lrs")
    if args.lrs is not None and not sgd:
        parser.error("--lrs: a learning-rate grid is only for --optimizer sgd (AdamW uses --lr)")
    if sgd and args.rules is None:
        from .demo.sgd import SGD_METHODS

        cfg = dataclasses.replace(cfg, rules=SGD_METHODS)
    if args.arch is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, arch=args.arch))
    overrides = {k: v for k, v in {
        "steps": args.steps, "seeds": args.seeds, "rules": args.rules, "tau": args.tau, "lr": args.lr,
        "modulate": args.modulate, "num_groups": args.num_groups, "pretrain_steps": args.pretrain_steps,
        "threads": args.threads, "workers": args.workers, "cache_dir": args.cache_dir,
        "plain_backward": args.plain_backward,
    }.items() if v is not None}
    if args.no_cache:
        overrides["cache_dir"] = None
    if args.base_per_seed:
        overrides["base_per_seed"] = True
    if args.pretrain:
        overrides["pretrain"] = True
    cfg = dataclasses.replace(cfg, device=device, **overrides)
    if cfg.eval_every > cfg.steps:
        cfg = dataclasses.replace(cfg, eval_every=cfg.steps)
    try:
        cfg.check()
    except ValueError as e:
        parser.error(str(e))
    kind = ("sgd-" if sgd else "") + ("study" if args.full else "demo")
    out = os.path.abspath(args.out or os.path.join("pareto_lora_out", time.strftime(f"{kind}-%Y%m%d-%H%M%S")))
    _writable_folder(parser, "--out", out)
    if cfg.cache_dir not in (None, "default"):
        _writable_folder(parser, "--cache-dir", cfg.cache_dir)
    elif cfg.cache_dir == "default":
        from .demo.base import default_cache_dir

        _writable_folder(parser, "--cache-dir (default: $PARETO_LORA_CACHE or ~/.cache)", default_cache_dir())
    if sgd:
        from .demo.sgd import SGD_LRS, run_sgd_study

        run_sgd_study(dataclasses.replace(cfg, optimizer="sgd"), out, lrs=args.lrs or SGD_LRS, progress=not args.no_progress)
    else:
        run_demo(cfg, out, progress=not args.no_progress)
    return 0


def _cmd_demo_digits(args, parser, device: str) -> int:
    """`demo --world digits`: the study on real handwritten digits (app/demo/digits)."""
    from .demo.digits import DEFAULT, FULL, QUICK, STRONG, DigitsConfig, run_digits_demo

    shapes_only = {"--optimizer sgd": args.optimizer == "sgd", "--lrs": args.lrs is not None, "--arch": args.arch is not None,
                   "--base-per-seed": args.base_per_seed, "--pretrain-steps": args.pretrain_steps is not None,
                   "--pretrain": args.pretrain, "--plain-backward": args.plain_backward is not None}
    bad = [k for k, given in shapes_only.items() if given]
    if bad:
        parser.error(f"--world digits: {', '.join(bad)} belong to the shapes world (expected without them)")
    overrides = {k: v for k, v in {"steps": args.steps, "seeds": args.seeds, "rules": args.rules, "tau": args.tau,
                                   "lr": args.lr, "modulate": args.modulate, "num_groups": args.num_groups,
                                   "threads": args.threads, "workers": args.workers,
                                   "cache_dir": args.cache_dir}.items() if v is not None}
    if args.lr is not None:
        overrides["lrs"] = ()  # a given rate replaces the tuning
    if args.no_cache:
        overrides["cache_dir"] = None
    if args.objectives == 3:
        return _cmd_demo_three(args, parser, device, overrides)
    if args.versus is not None:
        parser.error("--versus: expected --objectives 3")
    presets = [("digits", QUICK if args.quick else FULL if args.full else DEFAULT)] + ([("digits-strong", STRONG)] if args.full else [])
    settings = []
    for name, preset in presets:
        cfg = DigitsConfig(**{**preset, **overrides, "device": device})
        try:
            cfg.check()
        except ValueError as e:
            parser.error(str(e))
        settings.append((name, cfg))
    kind = "digits-" + ("study" if args.full else "demo")
    out = os.path.abspath(args.out or os.path.join("pareto_lora_out", time.strftime(f"{kind}-%Y%m%d-%H%M%S")))
    run_digits_demo(settings, out, shapes_seeds=settings[0][1].seeds if args.full else None)
    return 0


def _cmd_demo_three(args, parser, device: str, overrides: dict) -> int:
    """`demo --world digits --objectives 3`: the K = 3 rules against fixed loss weights (docs/study_three.md)."""
    from .demo.digits import DigitsConfig
    from .demo.digits.three import GRID, METHODS
    from .demo.digits.three_study import QUICK3, QUICK3_METHODS, STUDY3, check_methods, run_three_demo

    if args.full:
        parser.error("--objectives 3: expected without --full (the K = 3 study has one size; --quick for a smoke test)")
    if args.tau is not None:
        parser.error("--tau: expected without --objectives 3 (the K = 3 rules take no tau)")
    methods = overrides.pop("rules", QUICK3_METHODS if args.quick else METHODS)
    try:
        methods = check_methods(methods)
        cfg = DigitsConfig(**{**(QUICK3 if args.quick else STUDY3), **overrides, "device": device})
        cfg.check()
    except ValueError as e:
        parser.error(str(e))
    if args.versus is not None and (args.versus not in GRID or args.versus not in methods):
        parser.error(f"--versus: expected a grid point among the methods ({', '.join(m for m in methods if m in GRID)}), "
                     f"got {args.versus!r}")
    out = os.path.abspath(args.out or os.path.join("pareto_lora_out", time.strftime("digits-three-%Y%m%d-%H%M%S")))
    _writable_folder(parser, "--out", out)
    run_three_demo(cfg, methods, out, versus=args.versus)
    return 0


def _cmd_bench(args, parser) -> int:
    if _missing_extra("bench", ("tqdm",)):
        return 2
    import torch
    from tqdm.auto import tqdm

    from ..backends import available_backends
    from .benchmarking import (DTYPES, ORACLE, default_backends, default_baselines, environment, format_rows,
                               run_suite)

    device = _device(parser, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    available = available_backends(device)
    backends = list(args.backends) if args.backends else default_backends(device)
    if ORACLE in backends:
        parser.error(f"--backends: {ORACLE!r} is the float64 correctness oracle, not a speed contender "
                     f"(the tests check the backends against it); available: {', '.join(default_backends(device))}")
    bad = [b for b in backends if b not in available]
    if bad:
        parser.error(f"--backends: {', '.join(bad)} not available on {device}; available: "
                     f"{', '.join(default_backends(device))}")
    dtypes = [DTYPES[d] for d in args.dtypes]
    sizes = args.sizes or ((1 << 20, 1 << 24, 1 << 26) if device.startswith("cuda") else (1 << 16, 1 << 20))
    _check_bench_sizes(parser, sizes, args.segments, device)
    baselines = list(args.baselines) if args.baselines is not None else default_baselines(device)
    bad = [b for b in baselines if b not in default_baselines(device)]
    if bad:
        parser.error(f"--baselines: {', '.join(bad)} not meant for {device}; expected names from: "
                     f"{', '.join(default_baselines(device))}")
    print(f"integrate(rule={args.rule!r}, {args.segments} segments of random sizes) on {device}; backends: "
          f"{', '.join(backends) or 'none'}; baselines: {', '.join(baselines) or 'none'}; {args.repeat} interleaved "
          f"rounds per case (fewer past {args.max_seconds:g} s, at least 3), min and median.")
    print(environment(device))
    print("GB/s(3N) = 3 x numel x itemsize / min time; copy GB/s = a same-footprint copy_ timed in the same rounds; "
          "/2-pass and /1-pass = min time over 5N and 3N bytes at that bandwidth (1.00 = at the floor); "
          "x <baseline> = its min time / the row's.")
    with tqdm(total=len(sizes) * len(dtypes), desc="bench", leave=False, disable=args.no_progress) as bar:
        rows = run_suite(device, sizes, dtypes, segments=args.segments, rule=args.rule, backends=backends,
                         baselines=baselines, progress=bar, rounds=args.repeat, max_seconds=args.max_seconds)
    print(format_rows(rows))
    print(f"after: {environment(device).rsplit('; ', 1)[1]}")
    return 0


def _cmd_info(args, parser) -> int:
    import torch

    import pareto_lora

    from .env import backend_availability, package_versions

    print(f"pareto-lora {pareto_lora.__version__} ({os.path.dirname(pareto_lora.__file__)})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    accel = f"CUDA {torch.version.cuda}" if torch.version.cuda else (f"HIP {torch.version.hip}" if torch.version.hip else "CPU-only build")
    print(f"torch build: {accel}; GPUs: {gpu}; CPU threads: {torch.get_num_threads()}")
    print("")
    print(f"{'backend':<12} {'built':<6} {'usable':<7} note")
    for name, built, usable, note in backend_availability():
        print(f"{name:<12} {'yes' if built else 'no':<6} {'yes' if usable else 'no':<7} {note}")
    print("")
    print(f"available_backends('cpu'): {', '.join(pareto_lora.available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"available_backends('cuda'): {', '.join(pareto_lora.available_backends('cuda'))}")
    print("")
    for name, version in package_versions().items():
        print(f"{name:<13} {version or 'not installed'}")
    print(f"rules: {', '.join(pareto_lora.RULES)}")
    return 0


def _cmd_study(args, parser) -> int:
    """The report of a study's log (``pareto_lora.study``), finished or not, or of the logs of one study
    split by seed over several jobs: to read a study that runs, or ran, elsewhere without Python."""
    import json

    from ..study import Result

    for path in args.log:
        if not os.path.isfile(path):
            parser.error(f"log: expected an existing study log file (JSON lines), got {path!r}")
    try:
        result = Result.from_logs(args.log)  # one log: the same result as Result.from_log
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        parser.error(f"log: expected a readable study log, got {e}")
    print(json.dumps(result.as_dict(), allow_nan=False) if args.json else result.report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..rules import RULES

    parser = argparse.ArgumentParser(
        prog="pareto-lora",
        description="Modality-balanced gradient integration for LoRA fine-tuning of multimodal models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,study,bench,info}")
    sub.required = True

    demo = sub.add_parser("demo", help="run the modality-imbalance experiment (all rules, several seeds)",
                          description="Pre-train a tiny Llama over text + image tokens, LoRA-fine-tune it once per "
                                      "rule and seed, print a table and a verdict, write results.json and PNG plots.")
    demo.add_argument("--world", choices=("shapes", "digits"), default="shapes",
                      help="shapes (default: the synthetic world with exact floors) or digits (real 8x8 handwritten "
                           "digits from scikit-learn, VQ tokens, generation and understanding; docs/study_digits.md)")
    demo.add_argument("--objectives", type=int, choices=(2, 3), default=2,
                      help="--world digits: 2 (text, image; default) or 3 (text, understanding, generation: the K = 3 "
                           "rules against a grid of fixed loss weights, 10 paired seeds; docs/study_three.md)")
    demo.add_argument("--versus", help="--objectives 3: the fixed weighting (a grid point among the methods, e.g. u1g2) "
                                       "every rule is compared with at every weighting, named in advance (default: the "
                                       "grid's best point on the run's own seeds, reported as exploratory)")
    demo.add_argument("--quick", action="store_true", help="tiny smoke-test configuration (< 30 s on 2 CPU cores)")
    demo.add_argument("--full", action="store_true",
                      help="the whole study: 5 paired seeds, the full reweighting curve, every rule and balancer "
                           "(resumable: rerun with the same --out to continue)")
    demo.add_argument("--steps", type=_positive_int, help="fine-tuning steps per run (default 60; --full 80; --quick 12)")
    demo.add_argument("--seeds", type=_seeds, help="seed count (3 -> 0,1,2) or comma list (4,7); default 5 (--world digits: 3), --quick 2")
    demo.add_argument("--rules", type=_rules,
                      help="comma-separated methods: rules, balancers, text_only, image_only, w<k> loss weights "
                           "(default: a reduced set; --full: all)")
    demo.add_argument("--out", help="output folder (default ./pareto_lora_out/demo-<timestamp>)")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--tau", type=_positive_float, help="imbalance threshold on ||g_text||/||g_image|| (default 0.5)")
    demo.add_argument("--lr", type=_positive_float, help="LoRA learning rate (default 1e-2, tuned once for vanilla)")
    demo.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                      help="adamw (default: the main study, lr tuned once for vanilla) or sgd: the SGD study, the "
                           "learning rate tuned per method on a separate seed, default methods sum,w2,w4,pareto_lora,"
                           "pareto_lora_norm,rescale_only,mgda")
    demo.add_argument("--lrs", type=_float_list,
                      help="with --optimizer sgd: the learning rates to tune over (default 0.05,0.1,0.2,0.4,0.8,1.6)")
    demo.add_argument("--arch", choices=("llama", "chameleon"),
                      help="the model: llama (default; LlamaForCausalLM with image tokens) or chameleon (a small random "
                           "ChameleonForConditionalGeneration with IMGIMG image codes in its vocabulary map)")
    demo.add_argument("--modulate", choices=("lower", "middle", "upper", "all"),
                      help="layer groups that get the rule (default lower, as in the paper)")
    demo.add_argument("--num-groups", type=_positive_int, help="consecutive layer groups (default 3)")
    demo.add_argument("--pretrain-steps", type=int,
                      help="at most this many base pre-training steps (default 600; stops when the base solves its images)")
    demo.add_argument("--cache-dir", help="where pre-trained bases are cached (default $PARETO_LORA_CACHE or "
                                          "~/.cache/pareto_lora/bases)")
    demo.add_argument("--no-cache", action="store_true",
                      help="read and write no cached base (the shipped base is still used: add --pretrain to pre-train)")
    demo.add_argument("--pretrain", action="store_true",
                      help="pre-train the base in this process (cached as usual) instead of using the one shipped with "
                           "the package (shapes world)")
    demo.add_argument("--plain-backward", choices=("one", "two"),
                      help="how vanilla, the curve and the brackets take their gradients: one backward of the weighted "
                           "loss (the default demo), or the two per-modality gradients with per-layer statistics "
                           "(--full); shapes world")
    demo.add_argument("--base-per-seed", action="store_true",
                      help="fine-tuning seed s starts from a base pre-trained with seed s (each cached), so the seed "
                           "spread includes pre-training; default: one base (seed 0) for every seed")
    demo.add_argument("--threads", type=_positive_int,
                      help="torch CPU threads (default 1: robust on shared machines; 2 is ~1.4x faster on idle cores)")
    demo.add_argument("--workers", type=_positive_int,
                      help="processes for the fine-tuning runs (default: one per usable CPU when the base is cached "
                           "on disk, else 1); the results do not depend on it")
    demo.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    demo.set_defaults(func=_cmd_demo)

    study = sub.add_parser("study", help="the report of a study's log (pareto_lora.study, docs/your_data.md)",
                           description="Print the report of a pareto_lora.study log (finished or not): the power line, "
                                       "each rule against vanilla LoRA and against the reweighting curve.")
    study.add_argument("log", nargs="+", help="the study's JSON-lines log (Study(..., log=PATH)), or the logs of one "
                                              "study split by seed over several jobs (Result.from_logs)")
    study.add_argument("--json", action="store_true", help="print Result.as_dict() as JSON instead of the report")
    study.set_defaults(func=_cmd_study)

    bench = sub.add_parser("bench", help="microbenchmark integrate on every available backend vs plain-torch baselines and the memory floors")
    bench.add_argument("--device", default="cuda" if _cuda_available() else "cpu",
                       help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--sizes", type=_int_list,
                       help="comma-separated element counts (default: 65536,1048576 on cpu; "
                            "1048576,16777216,67108864 on cuda)")
    bench.add_argument("--dtypes", type=_dtypes, default=("float32", "bfloat16"), help="comma-separated (default float32,bfloat16)")
    bench.add_argument("--segments", type=_positive_int, default=64, help="segments (layer groups) per buffer (default 64)")
    bench.add_argument("--rule", choices=RULES, default="pareto_lora", help="rule (default pareto_lora)")
    bench.add_argument("--backends", type=lambda s: tuple(p for p in s.split(",") if p),
                       help="comma-separated subset of the available compiled backends (default: all of them; "
                            "the float64 'reference' is a correctness oracle and is never timed)")
    bench.add_argument("--baselines", type=lambda s: tuple(p for p in s.split(",") if p),
                       help="comma-separated plain-torch baselines (default: all meant for the device: "
                            "strong,compiled,naive_loop on cpu; also foreach on cuda)")
    bench.add_argument("--repeat", type=_positive_int, default=20,
                       help="interleaved rounds per case (min and median; default 20)")
    bench.add_argument("--max-seconds", type=_positive_float, default=3.0,
                       help="stop a case's rounds after this many seconds, once 3 are done (default 3)")
    bench.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's own)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)

    info = sub.add_parser("info", help="built and usable backends, package versions")
    info.set_defaults(func=_cmd_info)
    return parser


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, _subparser(parser, args.command))


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The subcommand's own parser, so that its errors print its usage line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    return parser


if __name__ == "__main__":
    sys.exit(main())
