"""LeRobot policies (SmolVLA, pi0 / pi0.5, ACT, diffusion) as the `lerobot` policy family: `policy.py` loads
and runs them, `structure.py` declares their hook points, `smolvlm.py` builds SmolVLA's VLM offline."""
