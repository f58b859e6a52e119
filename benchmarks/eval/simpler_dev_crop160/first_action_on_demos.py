"""The policy's first moves (cm) against the demonstration's, on the first frame of every 75th training episode.

Usage: python first_action_on_demos.py CHECKPOINT DATASET"""
import sys

import numpy as np

from vla_runtime.data.episodes import EpisodeStore
from vla_runtime.policies import make_policy
from vla_runtime.types import Observation

store = EpisodeStore(sys.argv[2])
policy = make_policy("ref_dit", checkpoint=sys.argv[1], noise_seed=0)
for i in range(0, len(store), 75):
    episode = store[i]
    policy.reset()
    obs = Observation({camera: frames[0] for camera, frames in episode.images.items()},
                      episode.state[0].astype(np.float32), episode.instruction, 0.0)
    moves = policy.predict_chunk(obs).actions[:3, :3] * 100
    print(episode.task[:12], episode.seed, "policy", np.round(moves[0], 1), np.round(moves[2], 1),
          "demonstration", np.round(episode.action[0, :3] * 100, 1), np.round(episode.action[2, :3] * 100, 1))
