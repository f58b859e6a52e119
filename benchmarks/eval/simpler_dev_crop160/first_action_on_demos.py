"""The policy's first action (cm) against the demonstration's, on the first frame of every 75th training
episode. Usage: python first_action_on_demos.py CHECKPOINT DATASET"""
import sys

import numpy as np
from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.policies import make_policy
from vla_runtime.types import Observation
store = EpisodeStore(sys.argv[2])
policy = make_policy("ref_dit", checkpoint=sys.argv[1], noise_seed=0)
for i in range(0, 900, 75):
    ep = store[i]; policy.reset()
    obs = Observation({c: f[0] for c, f in ep.images.items()}, ep.state[0].astype(np.float32), ep.instruction, 0.0)
    p = policy.predict_chunk(obs).actions[:3, :3] * 100
    print(ep.task[:12], ep.seed, "pol", np.round(p[0], 1), np.round(p[2], 1), "demo", np.round(ep.action[0, :3] * 100, 1), np.round(ep.action[2, :3] * 100, 1),
          "img std", round(float(ep.images["3rd_view_camera"][0].std()), 1))
