"""Launchers: where an evaluation's episodes run. A launcher is a factory registered under a name (`launcher=` on
the command line) that builds a `Pool`; `local` (worker processes, here) and `ray` (actors, `ray_pool.py`) are the
built-in ones, found through the `vla_runtime.launchers` entry point group like every plug-in (`plugins.py`).

A pool runs `worker_cls(*args).run(job)` for every job, each of its workers building one worker and keeping it (its
simulators and policy) for every job it gets, and yields the results as they finish; entering and leaving it as a
context starts and stops its workers.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol

from vla_runtime.plugins import Registry


class Pool(Protocol):
    def imap_unordered(self, jobs: list[Any]) -> Iterator[Any]:
        """The jobs' results as they finish; an exception inside a job re-raises here."""

    def __enter__(self) -> Pool: ...

    def __exit__(self, *exc: Any) -> None: ...


# (worker_cls, args, workers, address) -> Pool; `address`: where the launcher's cluster is (None: its default)
LauncherFactory = Callable[[type, tuple, int, "str | None"], Pool]
LAUNCHERS: Registry[LauncherFactory] = Registry("launcher", "vla_runtime.launchers")


def register_launcher(name: str) -> Callable[[LauncherFactory], LauncherFactory]:
    return LAUNCHERS.register(name)


_worker: Any = None


def _die_with_parent(parent: int) -> None:
    """Linux: the kernel ends this worker when the process that started it dies, so a killed vla-eval or
    vla-collect leaves no worker running its queued jobs (and writing into a dataset a new run also writes)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # it died while this process was still importing
            os._exit(1)


def _init_worker(parent: int, worker_cls: type, args: tuple) -> None:
    global _worker
    _die_with_parent(parent)
    import torch

    # One thread per process: the processes already use every core.
    torch.set_num_threads(1)
    _worker = worker_cls(*args)


def _run_in_worker(job: Any) -> Any:
    return _worker.run(job)


class WorkerPool:
    """Runs `worker_cls(*args).run(job)` in `workers` spawned processes, or inline when workers == 1.

    A worker class has `run(job)` and `close()`; each process builds one worker and keeps it (its
    simulators and policy) for every job it gets.
    """

    def __init__(self, worker_cls: type, args: tuple, workers: int):
        self.workers = max(1, min(workers, os.cpu_count() or 1))
        # Built here first even when processes will do the work: a bad checkpoint or setting then fails
        # with its own message instead of as a broken process pool.
        first = worker_cls(*args)
        self._inline = first if self.workers == 1 else None
        if self._inline is None:
            first.close()
        # spawn: a forked child would inherit the parent's GL and torch thread state.
        self._pool = None if self._inline else ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(os.getpid(), worker_cls, args))

    def imap_unordered(self, jobs: list[Any]) -> Iterator[Any]:
        """Results as they finish; an exception inside a job re-raises here."""
        if self._pool is None:
            yield from (self._inline.run(job) for job in jobs)
            return
        futures = [self._pool.submit(_run_in_worker, job) for job in jobs]
        yield from (future.result() for future in as_completed(futures))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        else:
            self._inline.close()


@register_launcher("local")
def local(worker_cls: type, args: tuple, workers: int, address: str | None = None) -> WorkerPool:
    """Worker processes on this machine (`address` does not apply)."""
    return WorkerPool(worker_cls, args, workers)
