"""Argument types and up-front checks of the ``pareto-lora`` command: argparse turns their
ValueError/ArgumentTypeError into a usage error (one line, exit 2); the checks run before
anything is created."""

from __future__ import annotations

import argparse
import os

# ---- argument types: argparse turns their ValueError/ArgumentTypeError into a usage error ------
def _rules(text: str) -> tuple[str, ...]:
    from .demo.digits.three import METHODS as THREE
    from .demo.methods import ALL_METHODS  # kernel rules, balancers, controls, loss weights

    # the names of every study; each study then checks its own (--objectives 3 has its grid's names)
    RULES = (*ALL_METHODS, *(m for m in THREE if m not in ALL_METHODS))

    names = tuple(r.strip() for r in text.split(",") if r.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of rules from: {', '.join(RULES)}")
    bad = [r for r in names if r not in RULES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown rule(s) {', '.join(map(repr, bad))}; expected names from: {', '.join(RULES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"rule listed twice in {text!r}")
    return names


def _seeds(text: str) -> tuple[int, ...]:
    """'3' -> seeds 0, 1, 2; '4,7' -> seeds 4 and 7."""
    try:
        parts = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed count (3) or a comma-separated seed list (4,7), got {text!r}") from None
    if "," not in text:
        if len(parts) != 1 or parts[0] < 1:
            raise argparse.ArgumentTypeError(f"expected a seed count >= 1, got {text!r}")
        return tuple(range(parts[0]))
    if not parts or len(set(parts)) != len(parts) or min(parts) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative seeds, got {text!r}")
    return tuple(parts)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers > 0, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"value listed twice in {text!r}")
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        floats = [float(p) for p in text.split(",") if p.strip()]  # 1e6 is a natural way to write a size
        if not all(f == int(f) for f in floats):
            raise ValueError
        values = tuple(int(f) for f in floats)
    except (ValueError, OverflowError):  # int(float("1e400")) is an OverflowError
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _dtypes(text: str) -> tuple[str, ...]:
    from .benchmarking import DTYPES

    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {', '.join(map(repr, bad))}; expected names from: {', '.join(DTYPES)}")
    return names


def _device(parser: argparse.ArgumentParser, name: str) -> str:
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        parser.error(f"--device: unknown device {name!r}; expected cpu or cuda")
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but torch.cuda.is_available() is False on this machine")
    return str(dev)


def _writable_folder(parser: argparse.ArgumentParser, flag: str, path: str) -> None:
    """`path` is a folder we can write into, or can be created as one: checked before anything is
    created, so that a bad path costs one line, not a traceback after minutes of work."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        parser.error(f"{flag}: expected a folder, {path} is a file")
    parent = path
    while not os.path.exists(parent):  # the nearest existing ancestor decides whether mkdir can work
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"{flag}: cannot create folder {path}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"{flag}: cannot write to {parent} (permission denied)")


# The most bytes the benchmark holds per element of one size: float32 a and b with their
# temporaries, the copies in the timed dtype, out and the copy baseline (8 x 4 bytes).
_BENCH_BYTES_PER_ELEMENT = 32


def _check_bench_sizes(parser: argparse.ArgumentParser, sizes, segments: int, device: str) -> None:
    import torch

    if min(sizes) < segments:
        parser.error(f"--segments: expected at most the smallest of --sizes ({min(sizes)}: one element per "
                     f"segment at least), got {segments}")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # inputs are generated on the host
    where = "host memory"
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_properties(torch.device(device)).total_memory
        memory, where = min(memory, gpu), ("GPU memory" if gpu < memory else where)
    need = max(sizes) * _BENCH_BYTES_PER_ELEMENT
    if need > memory:
        parser.error(f"--sizes: {max(sizes):,} elements need about {need / 2**30:,.1f} GiB, more than this machine's "
                     f"{memory / 2**30:,.1f} GiB of {where}")
