"""Episodes on Ray (`launcher=ray`): actors that each hold a simulator and a policy (an `EpisodeWorker`), on a local
cluster by default or on an existing one by address. The same interface as the process pool (`launchers.Pool`), so
results are the serial runner's for the same seeds. A job whose actor dies is retried (Ray restarts the actor and
runs the call again; past `retries` the job goes back to the queue for another actor), so no episode is lost, and
a result is taken once per job, so none is doubled.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from vla_runtime.evaluation.launchers import register_launcher


class _Actor:
    """On a Ray worker process: one worker (simulators, policy) kept for every job."""

    def __init__(self, worker_cls: type, args: tuple):
        import torch

        torch.set_num_threads(1)  # one actor per CPU: the actors already use every core
        self.worker = worker_cls(*args)

    def run(self, job: Any) -> Any:
        return self.worker.run(job)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayPool:
    def __init__(self, worker_cls: type, args: tuple, workers: int, address: str | None = None, retries: int = 3):
        import ray

        if not ray.is_initialized():
            # A local cluster of `workers` CPUs unless an address is given; the driver's environment (MUJOCO_GL,
            # threads) reaches the actors because they are started from it.
            ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        self._ray = ray
        self.retries = retries
        actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(_Actor)
        self.actors = [actor.remote(worker_cls, args) for _ in range(workers)]

    def imap_unordered(self, jobs: list[Any]) -> Iterator[Any]:
        """Results as they finish; each actor has one job at a time (a slow episode holds up no other)."""
        ray = self._ray
        queue = deque(jobs)
        running: dict[Any, tuple[Any, Any]] = {}  # object ref -> (actor, job)

        def submit(actor) -> None:
            if queue:
                job = queue.popleft()
                running[actor.run.remote(job)] = (actor, job)

        for actor in self.actors:
            submit(actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, job = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:  # dead for good: Ray restarted it `retries` times already
                self.actors.remove(actor)
                if not self.actors:
                    raise RuntimeError(f"every Ray actor died; the last error: {exc}") from exc
                queue.appendleft(job)  # another actor runs it
                idle = [a for a in self.actors if all(a is not busy for busy, _ in running.values())]
                if idle:
                    submit(idle[0])
                continue
            yield result
            submit(actor)

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        for actor in self.actors:
            self._ray.kill(actor)


@register_launcher("ray")
def ray(worker_cls: type, args: tuple, workers: int, address: str | None = None) -> RayPool:
    """Ray actors, on the cluster at `address` or a local one of `workers` CPUs."""
    return RayPool(worker_cls, args, workers, address)
