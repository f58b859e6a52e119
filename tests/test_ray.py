"""Episodes on a local Ray cluster: the serial runner's results, nothing lost when an actor is killed, resumable."""

import functools
import os
import signal

import pytest

from vla_runtime.evaluation.runner import EpisodeWorker, EvalJob, evaluate, read_journal
from vla_runtime.policies import make_policy
from vla_runtime.sim import make_suite

ray = pytest.importorskip("ray")
TASKS = ["reach-v3", "drawer-close-v3", "button-press-topdown-v3"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def expert_eval(suite, **options):
    # The scripted expert: deterministic and quick, so any difference would be the launcher's.
    return evaluate(functools.partial(make_policy, "expert", suite=suite), suite, TASKS, 3, progress=False,
                    **options)


def outcome(results):
    return [(r.task, r.seed, r.success, r.length, r.error) for r in results]


def test_ray_gives_the_serial_results_episode_for_episode(cluster):
    suite = make_suite("metaworld")
    serial = expert_eval(suite, workers=1)
    on_ray = expert_eval(suite, workers=2, launcher="ray")
    assert outcome(on_ray) == outcome(serial) and len(serial) == 9 and all(r.error is None for r in serial)


def test_a_killed_actor_loses_no_episode_and_doubles_none(cluster):
    from vla_runtime.evaluation.ray_pool import RayPool

    suite = make_suite("metaworld")
    factory = functools.partial(make_policy, "expert", suite=suite)
    jobs = [EvalJob(task, i, 1000000 + i) for task in TASKS for i in range(4)]
    with RayPool(EpisodeWorker, (factory, suite, None, None, None, None, None, "expert"), 2) as pool:
        victim = ray.get(pool.actors[0].pid.remote())
        results = []
        for result in pool.imap_unordered(jobs):
            if len(results) == 2:
                os.kill(victim, signal.SIGKILL)  # mid-sweep, with a job on it
            results.append(result)
        assert ray.get(pool.actors[0].pid.remote()) != victim  # Ray restarted it
    assert sorted((r.task, r.seed) for r in results) == sorted((job.task, job.seed) for job in jobs)


def test_a_resumed_run_skips_finished_episodes_and_survives_a_cut_line(tmp_path):
    suite = make_suite("metaworld")
    journal = tmp_path / "episodes.jsonl"
    full = expert_eval(suite, workers=1, journal=journal)
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:4]) + "\n" + lines[4][:25])  # killed while writing the 5th
    assert len(read_journal(journal)) == 4
    resumed = expert_eval(suite, workers=1, journal=journal)
    assert outcome(resumed) == outcome(full)
    assert len(journal.read_text().splitlines()) == 9  # 4 kept, 5 run again, the cut line gone
    journal.write_text("not json\n" + "\n".join(lines))
    with pytest.raises(ValueError, match="line 1: not an episode result"):
        read_journal(journal)
