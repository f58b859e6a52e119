"""vla-serve: any registered policy, with an acceleration profile and an execution backend, behind openpi's
websocket protocol (vla_runtime/serve). Runs until interrupted."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from vla_runtime.cli.build import accel_options
from vla_runtime.cli.common import UsageError, as_dict, hydra_cli, policy_factory, positive_int, suite, task_list
from vla_runtime.evaluation.runner import accelerate
from vla_runtime.serve.protocol import ObservationKeys
from vla_runtime.serve.server import PolicyServer, ServeConfig

TOKEN_VARIABLE = "VLA_SERVE_TOKEN"


def read_token(cfg: DictConfig) -> str | None:
    """The token from `token_file=`, else the VLA_SERVE_TOKEN environment variable, else `token=` (which every
    local user can read in the process list: a warning says so)."""
    sources = [name for name, given in (("token_file", cfg.token_file), (TOKEN_VARIABLE, os.environ.get(
        TOKEN_VARIABLE)), ("token", cfg.token)) if given]
    if len(sources) > 1:
        raise UsageError(f"vla-serve: the token is given twice ({' and '.join(sources)}): give one")
    if cfg.token_file:
        path = Path(cfg.token_file)
        if not path.is_file():
            raise UsageError(f"token_file={cfg.token_file}: no such file")
        token = path.read_text().strip()
        if not token:
            raise UsageError(f"token_file={cfg.token_file} is empty")
        return token
    if cfg.token:
        print(f"vla-serve: warning: token= is visible to every local user in the process list; prefer "
              f"{TOKEN_VARIABLE}=... or token_file=PATH", file=sys.stderr)
        return str(cfg.token)
    return os.environ.get(TOKEN_VARIABLE) or None


def serve_config(cfg: DictConfig) -> ServeConfig:
    try:
        return ServeConfig(host=cfg.host, port=cfg.port, token=read_token(cfg),
                           allow_insecure=bool(cfg.allow_insecure),
                           allowed_origins=tuple(cfg.allowed_origins), slots=positive_int(cfg, "slots"),
                           max_queue=positive_int(cfg, "max_queue"), busy_wait_ms=float(cfg.busy_wait_ms),
                           max_message_mb=float(cfg.max_message_mb),
                           max_prompt_chars=positive_int(cfg, "max_prompt_chars"),
                           max_connections=positive_int(cfg, "max_connections"),
                           read_ahead=positive_int(cfg, "read_ahead"), idle_timeout_s=float(cfg.idle_timeout_s),
                           keys=ObservationKeys(**as_dict(cfg.observation_keys)))
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def build_server(cfg: DictConfig) -> PolicyServer:
    config = serve_config(cfg)  # before the policies are built: a refused setting costs nothing
    if cfg.num_threads:
        torch.set_num_threads(positive_int(cfg, "num_threads"))
    sim = suite(cfg)
    name, factory = policy_factory(cfg, sim)
    accel = accel_options(cfg, name, task_list(cfg, sim))
    policies = []
    for _ in range(config.slots):
        policy = factory()
        sim.check_policy(policy, name)
        if accel is not None:
            accelerate(policy, sim, accel)
        policies.append(policy)
    spec = policies[0].spec
    metadata = {"server": "vla_runtime", "policy": name, "spec": dataclasses.asdict(spec),
                "profile": accel.profile.name if accel else "none", "exec": str(cfg.exec)}
    return PolicyServer(policies, config, metadata)


@hydra_cli("serve")
def main(cfg: DictConfig) -> None:
    server = build_server(cfg)
    print(f"vla-serve: {server.metadata['policy']} ({server.spec.describe()}; accel {server.metadata['profile']}, "
          f"exec {server.metadata['exec']}, {server.config.slots} slot(s)) on ws://{cfg.host}:{cfg.port}, "
          f"health: http://{cfg.host}:{cfg.port}/healthz; token {'required' if server.config.token else 'none'}; "
          f"requests hold at most {server.config.memory_bound_mb:.0f} MB", flush=True)
    try:
        asyncio.run(server.run())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
