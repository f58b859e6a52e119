import json
import subprocess
import sys
import time

import pytest
from hydra import compose, initialize_config_module

from vla_runtime.cli import eval as eval_cli
from vla_runtime.evaluation.metrics import markdown_summary, paired_delta, summarize, wilson_interval
from vla_runtime.evaluation.runner import EpisodeResult


def eval_config(tmp_path, *overrides):
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        return compose("eval", overrides=[f"output_dir={tmp_path}", "sim.image_size=64", *overrides])


def test_results_json_schema(tmp_path):
    cfg = eval_config(tmp_path, "policy=random", "tasks=[reach,drawer-close]", "episodes_per_task=2",
                      "workers=1", "sim.default_max_steps=20")
    eval_cli.run(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(results["success_rate"], float) and 0.0 <= results["success_rate"] <= 1.0
    assert set(results["per_task"]) == {"reach-v3", "drawer-close-v3"}
    for row in results["per_task"].values():
        assert set(row) >= {"success_rate", "ci95", "episodes"}
        low, high = row["ci95"]
        assert 0.0 <= low <= row["success_rate"] <= high <= 1.0
        assert row["episodes"] == 2
    assert set(results["latency_ms"]) == {"p50", "p95", "p99"}
    assert results["latency_ms"]["p50"] <= results["latency_ms"]["p95"] <= results["latency_ms"]["p99"]
    # Random policy with one action per call: one call per step, 20 steps unless it got lucky.
    assert results["policy_calls"] == sum(e["length"] for e in results["episodes"])
    assert isinstance(results["deadline_misses"], int)
    assert (tmp_path / "summary.md").read_text().startswith("## random on metaworld")


def test_video_is_written_per_episode(tmp_path):
    cfg = eval_config(tmp_path, "policy=expert", "tasks=[drawer-close]", "episodes_per_task=1", "workers=1",
                      "video=true")
    results = eval_cli.run(cfg)
    (episode,) = results["episodes"]
    assert episode["success"] and episode["video"].endswith(".mp4")
    import imageio.v3 as iio

    frames = iio.imread(episode["video"])
    assert frames.shape[0] == episode["length"] and frames.shape[1:] == (64, 64, 3)


def test_partial_measures_are_reported_beside_success():
    """A suite's partial measures (SIMPLER's grasp) become per-task shares and a column of the summary."""
    episodes = [EpisodeResult("carrot", 0, True, 60, [0.01], measures={"grasped": True, "on_target": True}),
                EpisodeResult("carrot", 1, False, 60, [0.01], measures={"grasped": True, "on_target": False}),
                EpisodeResult("spoon", 0, False, 60, [0.01], measures={"grasped": False, "on_target": False}),
                EpisodeResult("spoon", 1, False, 60, [0.01], measures={"grasped": False, "on_target": False})]
    results = summarize(episodes, ["carrot", "spoon"])
    assert results["per_task"]["carrot"]["measures"] == {"grasped": 1.0, "on_target": 0.5}
    assert results["per_task"]["spoon"]["measures"] == {"grasped": 0.0, "on_target": 0.0}
    assert results["episodes"][1]["measures"] == {"grasped": True, "on_target": False}
    table = markdown_summary(results, "test")
    assert "| partial measures |" in table and "| carrot | 50% | " in table and "grasped 100%, on_target 50% |" in table
    # Suites without measures keep the table as it was.
    plain = summarize([EpisodeResult("reach", 0, True, 10, [0.01])], ["reach"])
    assert "measures" not in plain["per_task"]["reach"] and "partial" not in markdown_summary(plain, "test")


@pytest.mark.parametrize(
    ("successes", "trials", "expected"),
    [(0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (5, 10, (0.2366, 0.7634)), (0, 0, (0.0, 1.0))],
)
def test_wilson_interval(successes, trials, expected):
    assert wilson_interval(successes, trials) == pytest.approx(expected, abs=1e-4)


def episodes(outcomes: list[bool], seed0: int = 0) -> list[dict]:
    return [{"task": f"task{i % 10}", "seed": seed0 + i // 10, "success": ok} for i, ok in enumerate(outcomes)]


def test_a_profile_that_changes_no_outcome_has_a_zero_width_paired_interval():
    run = episodes([i % 3 == 0 for i in range(200)])
    paired = paired_delta(run, run)
    assert (paired.pairs, paired.delta, paired.ci95, paired.wins, paired.losses, paired.p_value) == (
        200, 0.0, (0.0, 0.0), 0, 0, 1.0)
    assert paired.verdict(tolerance=0.0) == "no measurable loss" and str(paired) == "+0.0 [+0.0, +0.0]"


def test_the_paired_interval_on_synthetic_pairs():
    """The issue's MT10 example: 200 pairs, 7 discordant, 4 won by the profile and 3 by `none`: Wald [-2.1, +3.1]
    points (independent Wilson intervals would be about +-9.7 wide), and McNemar's exact p = 1."""
    base = [i < 88 for i in range(200)]  # 44.0 %
    profile = [(i < 85) or (88 <= i < 92) for i in range(200)]  # loses 85-87, wins 88-91: 44.5 %
    paired = paired_delta(episodes(base), episodes(profile))
    assert (paired.wins, paired.losses, paired.delta) == (4, 3, 0.005)
    assert paired.ci95 == pytest.approx((-0.020919, 0.030919), abs=1e-6)
    assert paired.p_value == pytest.approx(1.0) and paired.verdict(0.03) == "no measurable loss"
    # 8 lost, none won, of 100: p = 2 / 2^8; the interval [-13.3, -2.7] rules out no loss beyond 2 points.
    lost = paired_delta(episodes([True] * 100), episodes([i >= 8 for i in range(100)]))
    assert lost.p_value == pytest.approx(2 / 2**8) and lost.ci95 == pytest.approx((-0.13318, -0.02682), abs=1e-5)
    assert lost.verdict(0.03) == "inconclusive" and lost.verdict(0.02) == "loss"
    # Only episodes both runs ran are paired.
    assert paired_delta(episodes(base), episodes(profile[:150])).pairs == 150
    with pytest.raises(ValueError, match="No episode in common"):
        paired_delta(episodes(base), episodes(profile, seed0=1000))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("compare_to=/nonexistent/results.json", "compare_to=/nonexistent/results.json: not a vla-eval results.json"),
        ("accel=/nonexistent/profile.yaml", "accel=/nonexistent/profile.yaml: no such profile file"),
        ("tolerance_points=-1", "tolerance_points must be a number of success points in [0, 100], got -1"),
        ("tasks=[make-coffee]", "Unknown Meta-World task 'make-coffee' (did you mean 'coffee-push-v3'?). "
                                "Valid task names: assembly-v3"),
        ("policy=random sim.cameras=[wrist]", "Camera 'wrist' does not exist"),
        ("sim.cameras=[corner2]", "Policy 'ref_dit' (4-D actions, 4-D state, cameras ['corner4'] at 128x128, 80 Hz) "
                                  "does not fit suite 'metaworld' (4-D actions, 4-D state, cameras ['corner2'] at "
                                  "128x128, 80 Hz): cameras ['corner4'] are not rendered"),
        ("sim.image_size=64", "Policy 'ref_dit' (4-D actions, 4-D state, cameras ['corner4'] at 128x128, 80 Hz) "
                              "does not fit suite 'metaworld'"),
        ("+sim.imagesize=64", "Unknown Meta-World option(s) ['imagesize']"),
        ("episodes_per_task=0", "episodes_per_task must be a positive integer"),
        ("runtime.mode=fast", "runtime.mode must be 'sync' or 'realtime', got 'fast'"),
        ("runtime.mode=realtime runtime.latency_model=recorded", "needs runtime.recorded_latencies"),
        ("policy=ref_dit policy.checkpoint=/nonexistent", "Checkpoint /nonexistent is missing config.json"),
        ("policy=random launcher=slurm", "Unknown launcher 'slurm'. Registered: local, ray"),
        ("policy=random runtime.chunking=rtc", "runtime.chunking=rtc acts on latency in the loop: it needs "
                                               "runtime.mode=realtime"),
        ("policy=random runtime.mode=realtime runtime.chunking=smooth", "Unknown chunking 'smooth'; choose one of "
                                                                      "naive, rtc"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, override, message):
    process = subprocess.run(
        [sys.executable, "-m", "vla_runtime.cli.eval", *override.split(), "workers=1", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert message in process.stderr
    assert "Traceback" not in process.stderr


@pytest.mark.parametrize(
    ("cli", "override", "message"),
    [
        ("eval", "sim=no_such_suite", "Unknown sim 'no_such_suite'. Choices: libero, metaworld, simpler_bridge"),
        ("eval", "policy=ref_dt", "Unknown policy 'ref_dt' (did you mean 'ref_dit'?). Choices: expert, lerobot,"),
        ("eval", "runtime=fast", "Unknown runtime 'fast'. Choices: default"),
        ("eval", "tasks=[drawer-opn]", "Unknown Meta-World task 'drawer-opn' (did you mean 'drawer-open-v3'?). "
                                       "Valid task names: assembly-v3"),
        ("eval", "accel=bacc", "Unknown accel profile or method 'bacc' (did you mean 'bac'?). Profiles: bac,"),
        ("eval", "accel=[bac,head_cach]", "Unknown accel profile or method 'head_cach' (did you mean 'head_cache'?)"),
        ("eval", "launcher=rey", "Unknown launcher 'rey' (did you mean 'ray'?). Registered: local, ray"),
        ("eval", "exec=compil", "Unknown execution backend 'compil' (did you mean 'compile'?); choose one of eager,"),
        ("eval", "episode_per_task=3", "Could not override 'episode_per_task'. To append to your config use "
                                       "+episode_per_task=3 (did you mean 'episodes_per_task'?)"),
        ("eval", "runtime.request_whn=count", "(did you mean 'request_when'?)"),
        ("eval", "runtime.request_when=asp", "request_when must be one of asap, latency, count, got 'asp' (did you "
                                             "mean 'asap'?)"),
        ("train", "color_jitter=1.5", "color_jitter must be in [0, 1) (factors in [1 - x, 1 + x]), got 1.5"),
        ("train", "max_idle_frames=-1", "max_idle_frames must be >= 0 or null (all), got -1"),
        ("train", "early_frame_weight=0", "early_frames must be >= 0 and early_frame_weight > 0, got 0 and 0"),
        ("bench", "accel=[none,bacc]", "Unknown accel profile or method 'bacc' (did you mean 'bac'?)"),
        ("bench", "sim=metawrld", "Unknown sim 'metawrld' (did you mean 'metaworld'?). Choices:"),
        ("serve", "policy=no_such", "Unknown policy 'no_such'. Choices: expert,"),
        ("train", "model=ref_dt", "Unknown model 'ref_dt' (did you mean 'ref_dit'?). Choices: ref_ar, ref_dit"),
        ("collect", "sim=libro", "Unknown sim 'libro' (did you mean 'libero'?)"),
    ],
)
def test_an_unknown_name_is_one_line_with_the_choices(tmp_path, cli, override, message):
    """Hydra's own config-group and key errors included: one line on stderr, exit 2, as every other bad input."""
    process = subprocess.run([sys.executable, "-m", f"vla_runtime.cli.{cli}", override], capture_output=True,
                             text=True, timeout=120, cwd=tmp_path)
    assert process.returncode == 2, process.stderr
    assert process.stderr.startswith("error: ") and process.stderr.count("\n") == 1, process.stderr
    assert message in process.stderr
    assert {path.name for path in tmp_path.iterdir()} <= {"outputs"}  # no log beside the user's files


def test_eval_with_an_acceleration_profile_sync_and_realtime(tmp_path):
    calibration = tmp_path / "calibration"
    common = ["policy=ref_dit", "tasks=[drawer-close]", "episodes_per_task=1", "workers=1",
              "sim.default_max_steps=16", "calibration_per_task=1", f"calibration_dir={calibration}"]
    cfg = eval_config(tmp_path / "sync", "sim.image_size=128", "accel=[efficientvla,bac]", *common)
    results = eval_cli.run(cfg)
    assert results["accel"]["profile"] == "efficientvla+bac"
    assert results["accel"]["methods"]["head_cache"] == {"mode": "bac", "interval": 2, "updates": 4}
    assert sorted(p.name.split("-")[0] for p in calibration.glob("*.json")) == ["head_cache", "layer_prune"]
    assert results["policy_calls"] == 4 and not results["errors"]  # 16 steps, 4 actions per chunk

    cfg = eval_config(tmp_path / "realtime", "sim.image_size=128", "accel=flashvla", "runtime.mode=realtime",
                      "runtime.latency_model=fixed", "runtime.latency_ms=0", *common)
    results = eval_cli.run(cfg)
    loop = results["control_loop"]
    assert loop["reuses"] + results["policy_calls"] >= 4 and not results["errors"]
    with pytest.raises(ValueError, match="accel profile 'pdvla': parallel_decode needs"):
        eval_cli.run(eval_config(tmp_path / "bad", "sim.image_size=128", "accel=pdvla", *common))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_end_when_the_command_is_killed(tmp_path):
    """A killed vla-eval / vla-collect must not leave workers running its queued episodes."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vla_runtime.cli.eval", "policy=random", "tasks=mt10", "episodes_per_task=50",
         "workers=2", f"output_dir={tmp_path}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[int] = []
    deadline = time.monotonic() + 120
    while len(children) < 3 and time.monotonic() < deadline:  # the resource tracker and two workers
        time.sleep(0.5)
        listing = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout
        children = [int(pid) for pid in listing.split()]
    process.kill()
    process.wait()
    assert len(children) >= 3, "the workers never started"
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)]


def test_a_worker_holds_one_env_at_a_time():
    """Episodes come task after task; a worker closes the last task's env before it builds the next (ten LIBERO
    envs per worker ran out of memory)."""
    import functools

    from vla_runtime.evaluation.runner import EpisodeWorker, EvalJob
    from vla_runtime.policies import make_policy
    from vla_runtime.sim import make_suite

    suite = make_suite("metaworld", image_size=64, default_max_steps=3)
    worker = EpisodeWorker(functools.partial(make_policy, "random", suite=suite), suite, None, None)
    worker.run(EvalJob("reach-v3", 0, suite.eval_seeds.seed(0)))
    first = worker.envs["reach-v3"]
    worker.run(EvalJob("reach-v3", 1, suite.eval_seeds.seed(1)))
    assert worker.envs == {"reach-v3": first}  # the same task keeps its env
    closed, close = [], first.close
    first.close = lambda: (closed.append("reach-v3"), close())
    worker.run(EvalJob("drawer-close-v3", 0, suite.eval_seeds.seed(0)))
    assert closed == ["reach-v3"] and list(worker.envs) == ["drawer-close-v3"]
    worker.close()


def test_resume_continues_only_the_same_run(tmp_path):
    from vla_runtime.cli.common import UsageError
    from vla_runtime.cli.eval import run

    settings = ["policy=random", "tasks=[reach]", "workers=1", "sim.image_size=128"]
    first = run(eval_config(tmp_path, *settings, "episodes_per_task=2"))
    resumed = run(eval_config(tmp_path, *settings, "episodes_per_task=2", "resume=true"))
    assert [e["seed"] for e in resumed["episodes"]] == [e["seed"] for e in first["episodes"]]
    with pytest.raises(UsageError, match="holds a run with other episodes_per_task"):
        run(eval_config(tmp_path, *settings, "episodes_per_task=3", "resume=true"))
