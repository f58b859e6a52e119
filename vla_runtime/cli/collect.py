"""vla-collect: scripted-expert demonstrations on the train seeds, successful episodes only.

Resumable: seeds already written or already rejected are skipped, so running the same command again
after an interruption continues where it stopped.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from tqdm.auto import tqdm

from vla_runtime.cli.common import hydra_cli, positive_int, suite, task_list
from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.data.lerobot_format import LEROBOT_SUBDIR, check_format, convert_store
from vla_runtime.evaluation.launchers import WorkerPool
from vla_runtime.evaluation.runner import run_episode
from vla_runtime.sim.suite import Env, Suite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectJob:
    task: str
    seed: int


class CollectWorker:
    """Rolls out the expert from one seed and writes the episode if it succeeded."""

    def __init__(self, sim: Suite, root: str):
        self.sim = sim
        self.store = EpisodeStore(root)
        self.expert = sim.expert()
        self.envs: dict[str, Env] = {}

    def run(self, job: CollectJob) -> tuple[CollectJob, bool]:
        if job.task not in self.envs:
            self.envs[job.task] = self.sim.make_env(job.task, render=True)
        env = self.envs[job.task]
        result = run_episode(env, self.expert, job.seed, keep_trajectory=True)
        if result.success:
            self.store.write(result.trajectory.to_episode(job.task, self.sim.task_id(job.task), env.instruction,
                                                          job.seed, True))
        return job, result.success

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def collect(sim: Suite, tasks: list[str], episodes_per_task: int, output_dir: str | Path,
            max_attempts_per_task: int, workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Returns the number of episodes per task now in the dataset."""
    store = EpisodeStore(output_dir, sim.settings(), create=True)
    removed = store.remove_partial_episodes()
    if removed:
        log.warning("Removed %d partial episode(s) left by an interrupted run: %s", len(removed), removed)
    written = {(a["task"], a["seed"]) for a in store.index()}
    tried = written | store.rejected()
    kept = {task: sum(t == task for t, _ in written) for task in tasks}
    seeds = sim.seeds("train")
    next_index = dict.fromkeys(tasks, 0)
    attempts = {task: sum(t == task for t, _ in tried) for task in tasks}

    already = sum(min(n, episodes_per_task) for n in kept.values())
    bar = tqdm(total=episodes_per_task * len(tasks), initial=already, desc="demonstrations", unit="ep",
               disable=not progress)
    with WorkerPool(CollectWorker, (sim, str(output_dir)), workers) as pool:
        while True:
            # Each wave tries as many fresh seeds as each task still lacks episodes, task after task in
            # turn, so a run stopped early leaves every task its share.
            lacking = {task: max(0, episodes_per_task - kept[task]) for task in tasks}
            jobs = []
            for turn in range(max(lacking.values())):
                for task in tasks:
                    if turn >= lacking[task] or attempts[task] >= max_attempts_per_task:
                        continue
                    while (task, seeds.seed(next_index[task])) in tried:
                        next_index[task] += 1
                    jobs.append(CollectJob(task, seeds.seed(next_index[task])))
                    next_index[task] += 1
                    attempts[task] += 1
            if not jobs:
                break
            for job, success in pool.imap_unordered(jobs):
                if success:
                    kept[job.task] += 1
                    bar.update()
                else:
                    store.add_rejected(job.task, job.seed)
    bar.close()
    short = {task: n for task, n in kept.items() if n < episodes_per_task}
    if short:
        log.warning("The expert failed too often on %s: fewer than %d episodes after %d attempts each",
                    short, episodes_per_task, max_attempts_per_task)
    return kept


@hydra_cli("collect")
def main(cfg: DictConfig) -> None:
    episodes_per_task = positive_int(cfg, "episodes_per_task")
    max_attempts = cfg.max_attempts_per_task or 3 * episodes_per_task
    dataset_format = check_format(cfg.format)
    sim = suite(cfg)
    kept = collect(sim, task_list(cfg, sim), episodes_per_task, cfg.output_dir, max_attempts,
                   workers=positive_int(cfg, "workers"))
    per_task = ", ".join(f"{task} {n}" for task, n in kept.items())
    print(f"{sum(kept.values())} episodes in {cfg.output_dir}: {per_task}")
    if dataset_format == "lerobot":
        # From the finished native store, which keeps the collection resumable; LeRobot refuses to
        # overwrite, so a re-run writes a fresh copy.
        root = Path(cfg.output_dir) / LEROBOT_SUBDIR
        shutil.rmtree(root, ignore_errors=True)
        root = convert_store(cfg.output_dir, root, use_videos=bool(cfg.lerobot_video),
                             workers=positive_int(cfg, "workers"))
        print(f"LeRobotDataset: {root}")


if __name__ == "__main__":
    main()
