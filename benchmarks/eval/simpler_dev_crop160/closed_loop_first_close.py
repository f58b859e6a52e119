"""Closed loop on development seeds: the first move (cm) of the policy and of the expert, and where the hand is
against the source object (cm) when the policy first closes the gripper.

Usage: python closed_loop_first_close.py CHECKPOINT"""
import sys

import numpy as np

from vla_runtime.policies import make_policy
from vla_runtime.sim.suite import configured_suite

suite = configured_suite("simpler_bridge", asset_dir="../shared/simpler/bridge_assets.tgz", image_size=160,
                         image_crop=[0.08, 0.0, 0.96, 0.88])[0]
policy = make_policy("ref_dit", checkpoint=sys.argv[1], noise_seed=0)
expert = suite.expert()
for task in suite.tasks()[:3]:
    with suite.make_env(task) as env:
        for seed in range(2000000, 2000004):
            obs = env.reset(seed, render=True)
            policy.reset()
            expert.reset()
            first_expert = expert.predict_chunk(obs).actions[0]
            first_policy = policy.predict_chunk(obs.without_privileged_state()).actions[0]
            closed = None
            for t in range(60):
                if t % 4 == 0:
                    chunk = policy.predict_chunk(obs.without_privileged_state()).actions
                action = chunk[t % 4]
                if action[6] < 0 and closed is None:
                    closed = (t, np.round((obs.state[:3] - obs.privileged_state[:3]) * 100, 1))
                obs, *_ = env.step(action)
            print(task[:12], seed, "first move: policy", np.round(first_policy[:3] * 100, 1),
                  "expert", np.round(first_expert[:3] * 100, 1), "| closes at step, hand - object (cm):", closed)
