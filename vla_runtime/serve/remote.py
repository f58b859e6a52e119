"""A policy on a `vla-serve` (or any openpi-protocol) server, as a local `Policy`: `policy=remote
policy.url=ws://host:8000`. The control loop, vla-eval, vla-replay and the ROS node use it like any other; its
latency then includes the network. A server that is down or dies makes `predict_chunk` raise (the loop counts a
policy error and holds the robot) and the next call tries to connect again.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from vla_runtime.policies.registry import register_policy
from vla_runtime.serve.protocol import ObservationKeys, ProtocolError, pack, unpack
from vla_runtime.types import ActionChunk, Observation, PolicySpec, PolicyStructure, image_crop


class RemotePolicy:
    """One connection per calling thread: a control loop with several requests in flight (`max_in_flight`, up to
    the server's slots) calls it from as many threads, each connection holding a slot of its own."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 30.0,
                 keys: ObservationKeys | None = None):
        self.url = url
        self.token = token
        self.timeout_s = timeout_s
        self.keys = keys or ObservationKeys()
        self._local = threading.local()
        self._connections: list[ClientConnection] = []
        self._lock = threading.Lock()
        self.metadata = self._connect()
        spec = {f.name: self.metadata["spec"][f.name] for f in dataclasses.fields(PolicySpec)
                if f.name in self.metadata["spec"]}
        self.spec = PolicySpec(**{**spec, "cameras": tuple(spec.get("cameras", ())),
                                  "image_size": tuple(spec["image_size"]) if spec.get("image_size") else None,
                                  "image_crop": image_crop(spec.get("image_crop")),
                                  "concurrent_requests": int(self.metadata.get("slots", 1))})
        self.structure = PolicyStructure()  # nothing to hook here: acceleration runs on the server

    def _connect(self) -> dict:
        headers = {"Authorization": f"Api-Key {self.token}"} if self.token else None
        try:
            # Entered as a context (websockets 17 deprecates a bare connect); `close` closes it.
            ws = connect(self.url, compression=None, max_size=None, additional_headers=headers,
                         open_timeout=self.timeout_s).__enter__()
            metadata = unpack(ws.recv(timeout=self.timeout_s))
        except (OSError, TimeoutError, WebSocketException, ProtocolError) as exc:
            raise ConnectionError(f"no policy server at {self.url}: {exc}") from exc
        self._local.ws = ws
        with self._lock:
            self._connections.append(ws)
        return metadata

    def _forget(self, ws: ClientConnection) -> None:
        ws.close()
        with self._lock:
            if ws in self._connections:
                self._connections.remove(ws)

    def _call(self, message: dict):
        if getattr(self._local, "ws", None) not in self._connections:  # none yet, or dropped (a failed reset)
            self._connect()
        ws = self._local.ws
        try:
            ws.send(pack(message))
            reply = ws.recv(timeout=self.timeout_s)
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._forget(ws)
            raise ConnectionError(f"policy server {self.url}: {type(exc).__name__}: {exc}") from exc
        if isinstance(reply, str):
            raise RuntimeError(f"policy server {self.url}: {reply}")
        return unpack(reply)

    def reset(self) -> None:
        """A new episode on every connection (called between episodes, with no request in flight)."""
        with self._lock:
            connections = list(self._connections)
        if not connections:
            self._call({"reset": True})
        for ws in connections:
            try:
                ws.send(pack({"reset": True}))
                ws.recv(timeout=self.timeout_s)
            except (OSError, TimeoutError, WebSocketException):
                self._forget(ws)  # its thread connects again on its next call

    def predict_chunk(self, obs: Observation) -> ActionChunk:
        reply = self._call(self.keys.to_message(obs, self.spec.cameras))
        actions = np.asarray(reply["actions"], dtype=np.float32)
        if actions.ndim != 2 or actions.shape[1] != self.spec.action_dim:
            raise RuntimeError(f"policy server {self.url} sent actions of shape {actions.shape}, "
                               f"expected [H, {self.spec.action_dim}]")
        return ActionChunk(actions, t0=obs.timestamp, dt=self.spec.control_dt or 0.0,
                           info={"server_timing": reply.get("server_timing", {})})

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for ws in connections:
            ws.close()
        self._local = threading.local()


@register_policy("remote")
def remote(url: str, token: str | None = None, timeout_s: float = 30.0,
           observation_keys: dict | None = None) -> RemotePolicy:
    """`token`: None takes the VLA_SERVE_TOKEN environment variable (a token on the command line is readable by
    every local user in the process list)."""
    return RemotePolicy(url, token or os.environ.get("VLA_SERVE_TOKEN"), timeout_s,
                        ObservationKeys(**(observation_keys or {})))
