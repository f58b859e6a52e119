"""Real-time control loop: executor, inference worker, action queue and merge, safety, governor."""
