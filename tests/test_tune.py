"""vla-tune: the goal, the Pareto front and the finalists on synthetic candidates; proposals from the methods'
declared search spaces on a tiny reference VLA; the whole command (both stages, resume, the profile it writes) on
the toy suite of the test tree."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_accel import observations, untrained
from test_toy_plugins import cli

from vla_runtime.accel.profiles import Accelerator, Profile, load_profile
from vla_runtime.evaluation.tuning import Candidate, Goal, finalists, pareto_front, propose, searchable

GOAL = Goal(min_speedup=1.5)


def candidate(trial: int, speedup: float, deviation: float) -> Candidate:
    methods = {"head_cache": {"mode": "static", "interval": trial + 1}} if trial else {}
    return Candidate(trial, methods, speedup, 100 / speedup, deviation, 1 / speedup,
                     GOAL.shortfall(100 / speedup, speedup))


def test_a_goal_is_one_positive_target():
    assert Goal(min_speedup=2.0).shortfall(50.0, 1.5) == pytest.approx(0.25)
    assert Goal(budget_ms=40.0).shortfall(30.0, 9.0) == pytest.approx(-0.25)
    assert str(Goal(budget_ms=40)) == "p50 <= 40 ms"
    for wrong in ({}, {"budget_ms": 40.0, "min_speedup": 2.0}, {"min_speedup": 0.0}):
        with pytest.raises(ValueError, match="Give one goal"):
            Goal(**wrong)


def test_the_front_and_the_finalists():
    found = [candidate(0, 1.0, 0.0), candidate(1, 1.6, 0.02), candidate(2, 1.4, 0.03), candidate(3, 2.0, 0.01),
             candidate(4, 1.7, 0.05)]
    assert [c.trial for c in pareto_front(found)] == [0, 3]  # 1, 2 and 4 are beaten by 3 on both
    # none of those that meet 1.5x moves actions by at most 0.001: the most faithful of them; 0 has no methods
    assert [c.trial for c in finalists(found, 2, max_deviation=0.001)] == [3, 1]
    twice = [*found, replace(candidate(3, 1.9, 0.01), trial=5)]  # trial 3's profile again: one finalist of both
    assert [c.trial for c in finalists(twice, 2, max_deviation=0.001)] == [3, 1]
    slow = [candidate(0, 1.0, 0.0), candidate(1, 1.2, 0.02), candidate(2, 1.3, 0.1)]
    assert [c.trial for c in finalists(slow, 3, max_deviation=1.0)] == [2]  # none meets the goal: the closest to it
    assert candidate(3, 2.0, 0.01).profile().methods == {"head_cache": {"mode": "static", "interval": 4}}


def test_the_finalists_spread_along_the_front_under_the_deviation_cap():
    found = [candidate(6, 1.4, 0.0005), candidate(1, 1.6, 0.001), candidate(5, 1.7, 0.003), candidate(2, 1.8, 0.002),
             candidate(3, 2.2, 0.004), candidate(7, 2.4, 0.008), candidate(4, 2.5, 0.02)]
    # the front of those meeting 1.5x: 1, 2, 3, 7, 4 (5 is beaten by 2); 4 moves actions too much; 6 misses the goal
    assert [c.trial for c in finalists(found, 3, max_deviation=0.01)] == [1, 3, 7]  # both ends and the middle
    assert [c.trial for c in finalists(found, 2, max_deviation=0.01)] == [1, 7]
    assert [c.trial for c in finalists(found, 9, max_deviation=0.01)] == [1, 2, 3, 7]
    assert [c.trial for c in finalists(found, 1, max_deviation=0.01)] == [1]


def test_the_choice_is_the_fastest_lossless_finalist_that_still_meets_the_goal():
    from vla_runtime.cli.tune import choose

    def row(trial, speedup, shortfall, verdict, low):
        return {"trial": trial, "speedup": speedup, "shortfall": shortfall,
                "paired": {"verdict": verdict, "ci95": [low, 0.02]}}

    rows = [row(1, 1.2, 0.1, "no measurable loss", -0.01), row(2, 1.5, -0.1, "no measurable loss", -0.02),
            row(3, 1.9, -0.4, "inconclusive", -0.08)]
    assert choose(rows)["trial"] == 2  # 3 is faster but may lose; 1 is lossless but missed the goal measured again
    assert choose(rows[:1])["trial"] == 1  # lossless beats meeting the goal
    assert choose([rows[2], row(4, 1.4, -0.1, "loss", -0.12)])["trial"] == 3 and choose([]) is None
    assert choose([row(5, 1.4, -0.1, "inconclusive", -0.055), row(6, 1.45, -0.1, "inconclusive", -0.055)])["trial"] == 6


def test_the_references_are_the_hand_written_profiles_the_policy_runs(tmp_path):
    from omegaconf import OmegaConf

    from vla_runtime.cli.tune import references

    accelerator = Accelerator(untrained("dit"), lambda: observations(2), tmp_path)
    names = [p.name for p in references(OmegaConf.create({"references": None}), accelerator)]
    assert {"bac", "vlacache", "flashvla"} <= set(names) and "none" not in names
    # efficientvla(_deep) select tokens or prune layers beyond this tiny LM; pdvla needs an AR decoder; tuned_*: not
    # written by hand
    assert not {"efficientvla", "efficientvla_deep", "pdvla", "tuned_ref_dit"} & set(names)
    assert accelerator.active is None
    with pytest.raises(ValueError, match="num_layers"):  # named by the user: an error, not left out
        references(OmegaConf.create({"references": ["efficientvla_deep"]}), accelerator)


class ScriptedTrial:
    """A stand-in for optuna's Trial: every method on, the first choice or the low end of each range."""

    def __init__(self):
        self.asked: list[str] = []

    def suggest_categorical(self, name, choices):
        self.asked.append(name)
        return True if choices == [False, True] else choices[0]

    def suggest_int(self, name, low, high, step=1):
        self.asked.append(name)
        return low

    def suggest_float(self, name, low, high):
        self.asked.append(name)
        return low


def test_proposals_come_from_the_methods_spaces_and_hold_only_what_runs_together():
    accelerator = Accelerator(untrained("dit"), None)
    methods = searchable(accelerator)
    assert methods == ["quantize", "layer_prune", "token_select", "visual_kv_reuse", "head_cache",
                       "step_reduction"]  # no AR decoder, no gate
    trial = ScriptedTrial()
    chosen = propose(trial, accelerator, methods)
    # token_select and visual_kv_reuse both replace the LM's forward: the later one is left out.
    assert chosen == {"quantize": {"scheme": "dynamic_int8", "parts": ["language_model"]},
                      "layer_prune": {"num_layers": 1}, "token_select": {"keep": 8, "strategy": "efficientvla",
                                                                          "layer": 0},
                      "head_cache": {"mode": "static", "interval": 2, "order": 0, "tolerance": None},
                      "step_reduction": {"mode": "schedule", "steps": 2}}
    assert "head_cache.mode" in trial.asked and "layer_prune.num_layers" in trial.asked
    accelerator.check(Profile("proposed", chosen))  # what it proposes applies


def test_vla_tune_on_the_toy_suite_writes_a_profile_the_other_commands_take_and_resumes(tmp_path):
    args = ["sim=toy", "policy=toy_vla", "min_speedup=1.01", "rounds=1", "finalist_rounds=1", "measurement_per_task=1",
            "frames_per_sequence=2", "calibration_per_task=1", "episodes_per_task=2", "workers=1", "num_threads=1",
            "finalists=1", "references=[bac,full]", f"output_dir={tmp_path / 'tune'}"]
    first = cli("tune", "trials=3", *args)
    assert first.returncode == 0, first.stderr
    report = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert report["trials"] == 3 and report["front"][0]["methods"] == {}  # the empty profile is always tried
    assert (tmp_path / "tune" / "pareto.png").stat().st_size > 0 and (tmp_path / "tune" / "front").is_dir()
    assert [row["name"] for row in report["references"]] == ["bac", "full"]  # measured beside the finalists
    # each as it ran: the methods `full` skips on this policy are not listed
    assert report["references"][1]["methods"].keys() < load_profile("full").methods.keys()
    # the confirmation commands name the policy and suite as this command did (a policy's config, not its family)
    assert report["confirm"][0].startswith("vla-eval sim=toy policy=toy_vla tasks=")
    assert "| bac | head_cache mode=bac" in (tmp_path / "tune" / "tune.md").read_text()
    for row in report["finalists"]:
        assert row["methods"] and row["paired"]["pairs"] == 4 and row["paired"]["verdict"]
    if report["chosen"] is not None:
        profile = load_profile(str(tmp_path / "tune" / "tuned.yaml"))
        assert profile.name == "tuned" and profile.methods == report["chosen"]["methods"]
        evaluated = cli("eval", "sim=toy", "policy=toy_vla", f"accel={tmp_path / 'tune' / 'tuned.yaml'}",
                        "episodes_per_task=1", "workers=1", f"output_dir={tmp_path / 'eval'}")
        assert evaluated.returncode == 0, evaluated.stderr
    # Resumed: only the missing trial runs, the closed-loop episodes come from the journals.
    again = cli("tune", "trials=4", *args)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "tune" / "tune.json").read_text())["trials"] == 4
    changed = cli("tune", "trials=4", *[a for a in args if not a.startswith("min_speedup")], "min_speedup=3")
    assert changed.returncode == 2 and "holds a tune run with other min_speedup" in changed.stderr
    two_goals = cli("tune", "budget_ms=40", f"output_dir={tmp_path / 'two'}")  # min_speedup is 1.3 by default
    assert two_goals.returncode == 2 and "Give one goal, budget_ms=<ms> or min_speedup=<x>" in two_goals.stderr
    vague = cli("tune", "max_deviation=small", f"output_dir={tmp_path / 'vague'}")
    assert vague.returncode == 2 and "max_deviation must be a share of the actions' variance" in vague.stderr
