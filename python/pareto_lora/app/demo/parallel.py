"""The study's (method, seed) runs on every core: one process per core, each with its own setup.

A run is single-threaded by default (``threads=1``: the model is tiny, and a second intra-op
thread stalls when another process holds the core), so on a 2-core machine a serial study leaves
one core idle. Here this process and one spawned worker per further core take the runs: each
worker prepares the setup once (worlds, floors and the base, which the parent has pre-trained and
cached on disk first, or which the package ships, so a worker only loads it) and then takes runs
from a shared queue, dearest first; this process, whose setup is made, takes the runs no worker has
started, meanwhile (it would otherwise wait while the workers import torch). Every run seeds itself
and starts from the same base, so a run's numbers do not depend on which process made it or in what order (``tests/app/test_parallel.py``
compares a parallel study with a serial one).

Both worlds use it: ``prepare`` and ``run_cell`` are the world's own functions (module-level, so
that a spawned process can import them), called as ``prepare(cfg, **prepare_kwargs)`` and
``run_cell(setup, cfg, rule, seed, runs_dir, **cell_kwargs)`` (keyword arguments that turn their
progress output off: only the parent prints).
"""

from __future__ import annotations

import collections
import concurrent.futures
import multiprocessing
import threading

from ..env import usable_cpus

__all__ = ["usable_cpus", "default_workers", "run_cells"]

_SETUP = None  # the worker process's setup (made once by _init)


def default_workers(base_on_disk: bool, device: str, cells: int) -> int:
    """Worker processes for `cells` runs: one per usable CPU on CPU studies whose base is on disk
    (cached, or shipped with the package: a worker loads it rather than pre-training it again), else 1
    (serial, in this process)."""
    if not base_on_disk or device != "cpu":
        return 1
    return max(1, min(usable_cpus(), cells))


def _init(prepare, cfg, prepare_kwargs: dict) -> None:
    global _SETUP
    _SETUP = prepare(cfg, **prepare_kwargs)


def _task(run_cell, cfg, rule: str, seed: int, runs_dir, cell_kwargs: dict):
    before = _SETUP.timings["runs_loaded"]
    run = run_cell(_SETUP, cfg, rule, seed, runs_dir, **cell_kwargs)
    return run, _SETUP.timings["runs_loaded"] > before


def run_cells(setup, prepare, run_cell, cfg, cells, runs_dir, *, cell_kwargs: dict, quiet_kwargs: dict,
              prepare_kwargs: dict | None = None, echo=None, line=None, cost=None) -> list:
    """The runs of `cells` ((rule, seed) pairs) in their order, in ``cfg.workers`` processes (None:
    :func:`default_workers`; the number used goes to ``setup.timings["workers"]``). `setup.timings`
    counts the runs as a serial study would (``finetune_s`` adds the runs' own seconds,
    ``runs_loaded`` the resumed ones).

    Serially the world's ``run_cell`` runs in this process with `cell_kwargs` (its own progress
    output); in workers with `quiet_kwargs`, and this process says how many workers there are and
    ``echo(line(run))`` as each run finishes (`echo` None: silent). `cost` (rule -> relative run
    time, optional): workers take the dearest runs first, so that no worker is left with a long run
    when the others have finished (the order changes no number)."""
    cells = list(cells)
    on_disk = cfg.cache_dir is not None or bool(setup.base_info.get("shipped"))
    workers = cfg.workers or default_workers(on_disk, cfg.device, len(cells))
    setup.timings["workers"] = workers
    if workers <= 1 or len(cells) <= 1:
        return [run_cell(setup, cfg, rule, seed, runs_dir, **cell_kwargs) for rule, seed in cells]
    if echo is not None:
        echo(f"fine-tuning {len(cells)} runs in {workers} processes (this one and {workers - 1} workers)")
    # spawn, not fork: the parent has torch's thread pools and possibly open progress bars.
    ctx = multiprocessing.get_context("spawn")
    runs: list = [None] * len(cells)

    def done(i: int, run, loaded: bool, here: bool) -> None:
        runs[i] = run
        if not here:  # this process's own runs counted themselves in setup.timings (run_cell)
            setup.timings["runs_loaded" if loaded else "finetune_s"] += 1 if loaded else run.seconds
        if echo is not None:
            echo(line(run))

    # This process has its setup already, so it runs cells too, beside workers - 1 spawned ones (which
    # first import torch and make theirs). A worker is handed its next cell only when it finishes one
    # (the pool would otherwise queue a cell ahead for it, which this process could not take back), so
    # neither side is left with two cells while the other has none.
    order = sorted(range(len(cells)), key=lambda i: -cost(cells[i][0])) if cost else list(range(len(cells)))
    todo, lock, inflight = collections.deque(order), threading.RLock(), {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers - 1, mp_context=ctx, initializer=_init,
                                                initargs=(prepare, cfg, dict(prepare_kwargs or {}))) as pool:

        def hand_out(_finished=None) -> None:
            with lock:
                while todo and sum(not f.done() for f in inflight) < workers - 1:
                    i = todo.popleft()
                    future = pool.submit(_task, run_cell, cfg, *cells[i], runs_dir, quiet_kwargs)
                    inflight[future] = i
                    future.add_done_callback(hand_out)

        hand_out()
        while True:
            with lock:
                i = todo.popleft() if todo else None
            if i is None:
                break
            before = setup.timings["runs_loaded"]
            run = run_cell(setup, cfg, *cells[i], runs_dir, **quiet_kwargs)
            done(i, run, setup.timings["runs_loaded"] > before, here=True)
            with lock:
                finished = [f for f in inflight if f.done() and runs[inflight[f]] is None]
            for f in finished:
                done(inflight[f], *f.result(), here=False)
        while True:  # the workers' last cells (each callback may have handed out one more)
            with lock:
                left = [f for f in inflight if runs[inflight[f]] is None]
            if not left:
                break
            f = next(concurrent.futures.as_completed(left))
            done(inflight[f], *f.result(), here=False)
    return runs
