"""vla-serve: any registered policy, with an acceleration profile and an execution backend, behind openpi's
websocket protocol (vla_runtime/serve). Runs until interrupted."""

from __future__ import annotations

import asyncio
import dataclasses

import torch
from omegaconf import DictConfig

from vla_runtime.cli.common import as_dict, hydra_cli, policy_factory, positive_int, suite, task_list
from vla_runtime.cli.eval import accel_options
from vla_runtime.serve.protocol import ObservationKeys
from vla_runtime.serve.server import PolicyServer, ServeConfig
from vla_runtime.sim.runner import accelerate


def build_server(cfg: DictConfig) -> PolicyServer:
    if cfg.num_threads:
        torch.set_num_threads(positive_int(cfg, "num_threads"))
    sim = suite(cfg)
    name, factory = policy_factory(cfg, sim)
    config = ServeConfig(host=cfg.host, port=cfg.port, token=cfg.token, slots=positive_int(cfg, "slots"),
                         max_queue=positive_int(cfg, "max_queue"), max_message_mb=float(cfg.max_message_mb),
                         keys=ObservationKeys(**as_dict(cfg.observation_keys)))
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
                "profile": accel["profile"].name if accel else "none", "exec": str(cfg.exec)}
    return PolicyServer(policies, config, metadata)


@hydra_cli("serve")
def main(cfg: DictConfig) -> None:
    server = build_server(cfg)
    print(f"vla-serve: {server.metadata['policy']} ({server.spec.describe()}; accel {server.metadata['profile']}, "
          f"exec {server.metadata['exec']}, {server.config.slots} slot(s)) on ws://{cfg.host}:{cfg.port}, "
          f"health: http://{cfg.host}:{cfg.port}/healthz", flush=True)
    try:
        asyncio.run(server.run())
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
