"""A policy server that openpi's `WebsocketClientPolicy` drives unchanged (vla-serve).

The event loop only moves messages: inference runs on one worker thread per policy replica (`slots`), so health
checks (`GET /healthz`) and other clients are answered while a policy computes. A client keeps one slot for its
connection (the least used when it connects); the slot's policy is reset before the first request of a client
whose state it does not hold, so no client ever continues another's episode (with more clients than slots, a
slot alternating between two clients resets at each switch). At most `max_queue` requests wait per slot; one
more is answered "busy" at once instead of joining an unbounded backlog. Errors (a malformed, oversized or
mis-shaped request, a failing policy) are answered with a text message, as openpi's server does, and the
connection and the server stay up; a message over `max_message_mb` closes that connection (1009).
"""

from __future__ import annotations

import asyncio
import http
import itertools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vla_runtime.serve.protocol import ObservationKeys, ProtocolError, pack, unpack
from vla_runtime.types import Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: a policy server is a remote-control port for a robot
    port: int = 8000
    token: str | None = None  # clients send `Authorization: Api-Key <token>` (openpi-client's api_key)
    slots: int = 1  # policy replicas, each on its own inference thread
    max_queue: int = 4  # requests waiting per slot before "busy"
    max_message_mb: float = 16.0
    keys: ObservationKeys = field(default_factory=ObservationKeys)

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_queue < 1 or self.max_message_mb <= 0:
            raise ValueError("vla-serve needs slots >= 1, max_queue >= 1 and max_message_mb > 0")


class _Slot:
    def __init__(self, index: int, policy: Policy):
        self.index = index
        self.policy = policy
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference-{index}")
        self.clients = 0
        self.waiting = 0  # requests queued or running
        self.state_of: int | None = None  # the client whose episode the policy's state belongs to


class PolicyServer:
    def __init__(self, policies: list[Policy], config: ServeConfig, metadata: dict):
        if len(policies) != config.slots:
            raise ValueError(f"{config.slots} slots need as many policies, got {len(policies)}")
        self.config = config
        self.spec = policies[0].spec
        self.slots = [_Slot(i, policy) for i, policy in enumerate(policies)]
        self.metadata = {**metadata, "slots": config.slots,
                         "keys": {"images": config.keys.image_keys(self.spec.cameras), "state": config.keys.state,
                                  "prompt": config.keys.prompt}}
        self._client_ids = itertools.count()
        self.counters = {"requests": 0, "errors": 0, "busy": 0, "clients": 0}

    # ---- HTTP before the websocket upgrade: health and authentication ----------------------------
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        token = self.config.token
        if token and request.headers.get("Authorization") != f"Api-Key {token}":
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong Api-Key\n")
        return None

    # ---- one client --------------------------------------------------------------------------------
    async def _handle(self, websocket: ServerConnection) -> None:
        client = next(self._client_ids)
        slot = min(self.slots, key=lambda s: (s.clients, s.index))
        slot.clients += 1
        self.counters["clients"] += 1
        try:
            await websocket.send(pack(self.metadata))
            async for message in websocket:
                await websocket.send(await self._answer(slot, client, message))
        except ConnectionClosed:
            pass  # the client left (an inference it was waiting for still finishes, then frees the slot)
        finally:
            slot.clients -= 1

    async def _answer(self, slot: _Slot, client: int, message: bytes | str) -> bytes | str:
        self.counters["requests"] += 1
        received = time.perf_counter()
        try:
            if isinstance(message, str):
                raise ProtocolError("expected a binary msgpack message, got text")
            request = unpack(message)
            if isinstance(request, dict) and request.get("reset") is True:
                slot.state_of = None  # the next request starts a new episode
                return pack({"reset": True})
            obs = self.config.keys.to_observation(request, self.spec, time.monotonic())
        except ProtocolError as exc:
            self.counters["errors"] += 1
            return f"bad request: {exc}"
        if slot.waiting >= self.config.max_queue:
            self.counters["busy"] += 1
            return f"busy: {slot.waiting} requests are waiting for this policy (max_queue={self.config.max_queue})"
        slot.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            chunk, infer_s = await loop.run_in_executor(slot.thread, self._infer, slot, client, obs)
        except Exception as exc:  # the policy failed on this request: the client is told, the server stays up
            self.counters["errors"] += 1
            log.warning("policy error: %s", exc)
            return f"policy error: {type(exc).__name__}: {exc}"
        finally:
            slot.waiting -= 1
        total_s = time.perf_counter() - received
        return pack({"actions": np.asarray(chunk.actions, np.float32),
                     "server_timing": {"infer_ms": 1000 * infer_s, "queue_ms": 1000 * (total_s - infer_s),
                                       "total_ms": 1000 * total_s}})

    @staticmethod
    def _infer(slot: _Slot, client: int, obs):
        """On the slot's thread."""
        if slot.state_of != client:
            slot.policy.reset()
            slot.state_of = client
        started = time.perf_counter()
        chunk = slot.policy.predict_chunk(obs)
        return chunk, time.perf_counter() - started

    # ---- running -----------------------------------------------------------------------------------
    async def run(self, ready: threading.Event | None = None, stop: asyncio.Event | None = None) -> None:
        async with serve(self._handle, self.config.host, self.config.port, compression=None,
                         max_size=int(self.config.max_message_mb * 2 ** 20),
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]  # the bound port (port=0: any free one)
            if ready is not None:
                ready.set()
            await (stop.wait() if stop is not None else server.serve_forever())

    def close(self) -> None:
        for slot in self.slots:
            slot.thread.shutdown(wait=True)


class ServerThread:
    """The server on its own event loop in a background thread (tests, benchmarks, and a process that also
    does other work): `with ServerThread(server) as s: ... s.url`."""

    def __init__(self, server: PolicyServer):
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vla-serve", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()
        try:
            self._loop.run_until_complete(self.server.run(self._ready, self._stop))
        except BaseException as exc:  # e.g. the port is taken: reported by __enter__
            self._error = exc
            self._ready.set()

    @property
    def url(self) -> str:
        return f"ws://{self.server.config.host}:{self.server.port}"

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self.server.close()
