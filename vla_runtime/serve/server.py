"""A policy server that openpi's `WebsocketClientPolicy` drives unchanged (vla-serve).

The event loop only moves messages: requests are parsed on a thread of their own and inference runs on one worker
thread per policy replica (`slots`), so health checks (`GET /healthz`) and other clients are answered while a
large request is read or a policy computes.

Clients and episodes. A client keeps one slot for its connection (the least used when it connects); the slot's
policy is reset before the first request of a client whose episode it does not hold, so no client ever continues
another's episode: with more clients than slots, a slot alternating between two clients resets at each switch.
`{"reset": true}` resets the sender's own episode only (a client that does not hold the slot's state has nothing to
reset there).

Everything is bounded. At most `max_queue` requests wait per slot: one more waits up to `busy_wait_ms` for a
place, then is answered "busy: ... retry in ~N ms" (openpi's client raises it as an error). At most
`max_connections` clients (more are refused with 503), each closed after `idle_timeout_s` without a request, each
read `read_ahead` messages ahead at most, none over `max_message_mb` (closed with 1009), prompts of at most
`max_prompt_chars`. So the memory requests can hold is at most about max_connections x (read_ahead + 4) x
max_message_mb (`ServeConfig.memory_bound_mb`). Errors (a malformed, oversized or mis-shaped request, a failing
policy) are answered with a short text message naming what was wrong (sizes and types, never the content), as
openpi's server does, and the connection and the server stay up.

Security. Loopback unless `host=` says otherwise, and a non-loopback address needs a token (or
`allow_insecure=True`); `Authorization: Api-Key <token>` (openpi-client's `api_key`), exactly one such header;
a browser's request (one with an `Origin` header) is refused unless its origin is in `allowed_origins`, so a web
page cannot drive the robot's policy.
"""

from __future__ import annotations

import asyncio
import hmac
import http
import ipaddress
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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        return host == "localhost"


@dataclass(frozen=True)
class ServeConfig:
    """How `vla-serve` runs (configs/serve.yaml documents each field for the command line).

    Attributes:
        host / port: where it listens; loopback by default (a policy server is a remote-control port for a robot).
        token: what clients send as `Authorization: Api-Key <token>`; None: no authentication (loopback only,
            unless `allow_insecure`).
        allow_insecure: listen beyond loopback without a token.
        allowed_origins: browser origins (`Origin` header) allowed to connect; any other browser request is refused.
        slots: policy replicas, each on its own inference thread.
        max_queue: requests waiting per slot before "busy".
        busy_wait_ms: how long a request finding its slot's queue full waits for a place before "busy".
        max_message_mb: the largest request; a larger one closes its connection (1009).
        max_prompt_chars: the longest prompt.
        max_connections: clients at once; more are refused (503).
        read_ahead: messages read ahead of the one being answered, per connection.
        idle_timeout_s: a connection without a request for this long is closed.
        keys: which request key is what.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allow_insecure: bool = False
    allowed_origins: tuple[str, ...] = ()
    slots: int = 1
    max_queue: int = 4
    busy_wait_ms: float = 250.0
    max_message_mb: float = 8.0
    max_prompt_chars: int = 1000
    max_connections: int = 8
    read_ahead: int = 1
    idle_timeout_s: float = 300.0
    keys: ObservationKeys = field(default_factory=ObservationKeys)

    def __post_init__(self) -> None:
        counts = {"slots": self.slots, "max_queue": self.max_queue, "max_prompt_chars": self.max_prompt_chars,
                  "max_connections": self.max_connections, "read_ahead": self.read_ahead}
        bad = [f"{name}={value}" for name, value in counts.items() if value < 1]
        bad += [f"{name}={value}" for name, value in (("max_message_mb", self.max_message_mb),
                                                      ("idle_timeout_s", self.idle_timeout_s)) if value <= 0]
        if self.busy_wait_ms < 0:
            bad.append(f"busy_wait_ms={self.busy_wait_ms}")
        if bad:
            raise ValueError(f"vla-serve: {', '.join(bad)}: counts must be >= 1, sizes and timeouts > 0, "
                             "busy_wait_ms >= 0")
        if not self.token and not is_loopback(self.host) and not self.allow_insecure:
            raise ValueError(f"vla-serve: host={self.host} is reachable from other machines and no token is set: "
                             "give one (VLA_SERVE_TOKEN=... or token_file=PATH), or say allow_insecure=true")

    @property
    def memory_bound_mb(self) -> float:
        """What requests can hold in memory at once, at most (every connection full)."""
        # Per connection: read_ahead messages waiting, the one being read, and the one being answered three times
        # over while it is decoded (the frame, msgpack's copy of its arrays' bytes, the arrays). Measured: 3
        # flooding connections held 28-29 MB of 2 MB messages at read_ahead=1, i.e. 5 messages each
        # (tests/test_serve_abuse.py).
        return self.max_connections * (self.read_ahead + 4) * self.max_message_mb


class _Slot:
    def __init__(self, index: int, policy: Policy):
        self.index = index
        self.policy = policy
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"inference-{index}")
        self.clients = 0
        self.waiting = 0  # requests queued or running
        self.freed = asyncio.Condition()  # notified when a request leaves (bound to the loop that first waits)
        self.infer_s = 0.05  # a running mean of inference time: the retry hint of "busy"
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
                                  "prompt": config.keys.prompt},
                         "limits": {"max_message_mb": config.max_message_mb,
                                    "max_prompt_chars": config.max_prompt_chars, "max_queue": config.max_queue,
                                    "idle_timeout_s": config.idle_timeout_s}}
        self._client_ids = itertools.count()
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")
        self.connections: set[ServerConnection] = set()
        self.counters = {"requests": 0, "errors": 0, "busy": 0, "clients": 0, "refused": 0, "idle_closed": 0}

    # ---- HTTP before the websocket upgrade: health, connection cap, authentication -----------------
    def _process_request(self, connection: ServerConnection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        refusal = self._refusal(request.headers.get_all("Authorization"))
        if refusal is not None:
            self.counters["refused"] += 1
            return connection.respond(*refusal)
        return None

    def _refusal(self, authorization: list[str]) -> tuple[http.HTTPStatus, str] | None:
        if len(self.connections) >= self.config.max_connections:
            return http.HTTPStatus.SERVICE_UNAVAILABLE, f"{self.config.max_connections} clients are connected " \
                                                        "(max_connections); try again later\n"
        token = self.config.token
        if len(authorization) > 1:
            return http.HTTPStatus.BAD_REQUEST, "more than one Authorization header\n"
        if token and not (authorization and hmac.compare_digest(authorization[0].encode(),
                                                                f"Api-Key {token}".encode())):
            return http.HTTPStatus.UNAUTHORIZED, "missing or wrong Api-Key\n"
        return None

    # ---- one client --------------------------------------------------------------------------------
    async def _handle(self, websocket: ServerConnection) -> None:
        client = next(self._client_ids)
        slot = min(self.slots, key=lambda s: (s.clients, s.index))
        slot.clients += 1
        self.counters["clients"] += 1
        self.connections.add(websocket)
        try:
            await websocket.send(pack(self.metadata))
            while True:
                try:
                    message = await asyncio.wait_for(websocket.recv(), self.config.idle_timeout_s)
                except TimeoutError:
                    self.counters["idle_closed"] += 1
                    await websocket.close(1000, f"no request for {self.config.idle_timeout_s:g} s (idle_timeout_s)")
                    return
                await websocket.send(await self._answer(slot, client, message))
        except ConnectionClosed:
            pass  # the client left (an inference it was waiting for still finishes, then frees the slot)
        finally:
            self.connections.discard(websocket)
            slot.clients -= 1

    def _parse(self, message: bytes | str):
        """On the parsing thread: the request as an Observation, or None for a reset (ProtocolError if bad)."""
        if isinstance(message, str):
            raise ProtocolError("expected a binary msgpack message, got text")
        request = unpack(message)
        if isinstance(request, dict) and request.get("reset") is True:
            return None
        return self.config.keys.to_observation(request, self.spec, time.monotonic(), self.config.max_prompt_chars)

    async def _answer(self, slot: _Slot, client: int, message: bytes | str) -> bytes | str:
        self.counters["requests"] += 1
        received = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            obs = await loop.run_in_executor(self._parser, self._parse, message)
        except ProtocolError as exc:
            self.counters["errors"] += 1
            return _short(f"bad request: {exc}")
        if obs is None:
            if slot.state_of == client:
                slot.state_of = None  # this client's next request starts a new episode; no other client's
            return pack({"reset": True})
        if not await self._enter(slot):
            self.counters["busy"] += 1
            retry_ms = 1000 * slot.infer_s * max(1, slot.waiting)
            return (f"busy: {slot.waiting} requests are waiting for this policy (max_queue={self.config.max_queue}); "
                    f"retry in ~{retry_ms:.0f} ms")
        try:
            chunk, infer_s = await loop.run_in_executor(slot.thread, self._infer, slot, client, obs)
        except Exception as exc:  # the policy failed on this request: the client is told, the server stays up
            self.counters["errors"] += 1
            log.warning("policy error: %s", _short(str(exc)))
            return _short(f"policy error: {type(exc).__name__}: {exc}")
        finally:
            await self._leave(slot)
        slot.infer_s = 0.8 * slot.infer_s + 0.2 * infer_s
        total_s = time.perf_counter() - received
        return pack({"actions": np.asarray(chunk.actions, np.float32),
                     "server_timing": {"infer_ms": 1000 * infer_s, "queue_ms": 1000 * (total_s - infer_s),
                                       "total_ms": 1000 * total_s}})

    async def _enter(self, slot: _Slot) -> bool:
        """A place in the slot's queue, waiting up to busy_wait_ms for one; False: busy."""
        async with slot.freed:
            try:
                await asyncio.wait_for(slot.freed.wait_for(lambda: slot.waiting < self.config.max_queue),
                                       self.config.busy_wait_ms / 1000)
            except TimeoutError:
                return False
            slot.waiting += 1
            return True

    async def _leave(self, slot: _Slot) -> None:
        async with slot.freed:
            slot.waiting -= 1
            slot.freed.notify()

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
        config = self.config
        # Origins: requests without one (robots, scripts, openpi-client) and the allowed browser origins.
        async with serve(self._handle, config.host, config.port, compression=None,
                         max_size=int(config.max_message_mb * 2 ** 20), max_queue=config.read_ahead,
                         origins=[None, *config.allowed_origins], process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]  # the bound port (port=0: any free one)
            if ready is not None:
                ready.set()
            await (stop.wait() if stop is not None else server.serve_forever())

    def close(self) -> None:
        self._parser.shutdown(wait=True)
        for slot in self.slots:
            slot.thread.shutdown(wait=True)


MAX_REPLY_CHARS = 300


def _short(text: str) -> str:
    """An error reply of bounded length (what it names comes from the client)."""
    return text if len(text) <= MAX_REPLY_CHARS else text[: MAX_REPLY_CHARS - 3] + "..."


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
