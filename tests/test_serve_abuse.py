"""vla-serve driven as an attacker would (issue 28), loopback only, bounded in count and time: every bad request is
a short text reply and never a 1011, memory stays within the stated bound under a flood, a client cannot touch
another's episode, and the security defaults hold."""

import multiprocessing
import os
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hydra import compose, initialize_config_module
from test_accel import untrained
from test_serve import CountingPolicy, call, request, serve
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from vla_runtime.cli.common import UsageError
from vla_runtime.cli.serve import read_token
from vla_runtime.policies.ref_vla.policy import TEXT_CACHE_SIZE
from vla_runtime.serve.protocol import pack, unpack
from vla_runtime.serve.server import MAX_REPLY_CHARS, ServeConfig


def generic(data, dtype):
    return {b"__npgeneric__": True, b"data": data, b"dtype": dtype}


# Issue 28, case 1: each of these escaped as an uncaught exception and closed the connection with 1011.
UNCAUGHT_BEFORE = [
    ("-1 as uint8", generic(-1, "|u1")),
    ("300 as uint8", generic(300, "|u1")),
    ("2**64 - 1 as int64", generic(2**64 - 1, "<i8")),
    ("a string", "abcd"),
    ("a dict", {"a": 1}),
    ("a nested list", [1, [2, 3], 4, 5]),
    ("strings in a list", ["1", "2", "x", "4"]),
    ("16 raw bytes", b"\x00" * 16),
]


@pytest.mark.parametrize("what,state", UNCAUGHT_BEFORE, ids=[what for what, _ in UNCAUGHT_BEFORE])
def test_a_malformed_state_is_a_text_reply_and_the_connection_stays(what, state):
    with serve(CountingPolicy()) as server, connect(server.url) as ws:
        ws.recv(timeout=10)
        reply = call(ws, {**request(), "observation/state": state})
        assert isinstance(reply, str) and reply.startswith("bad request: "), reply
        assert "'observation/state' must be 4 finite numbers" in reply or "malformed array" in reply, reply
        assert call(ws, request())["actions"].shape == (3, 4)  # not closed


def test_error_replies_are_short_whatever_the_request_carries():
    """Case 2: a 4,000,000-number state was echoed back (an 84 MB reply built on the event loop)."""
    with serve(CountingPolicy(), max_message_mb=64) as server, connect(server.url, max_size=None) as ws:
        ws.recv(timeout=10)
        for state in (np.arange(4_000_000, dtype=np.float32), [0.5] * 4_000_000, "x" * 1_000_000):
            reply = call(ws, {**request(), "observation/state": state})
            assert isinstance(reply, str) and len(reply) <= MAX_REPLY_CHARS and "4 finite numbers" in reply
        health = urllib.request.urlopen(server.url.replace("ws://", "http://") + "/healthz", timeout=10)
        assert health.status == 200


def test_the_prompt_cache_is_bounded():
    """Case 3: every distinct prompt stayed cached forever."""
    policy = untrained("dit")
    for index in range(TEXT_CACHE_SIZE + 40):
        policy._text(f"open the drawer number {index}")
    assert policy._text.cache_info().currsize == TEXT_CACHE_SIZE


def test_a_prompt_over_the_limit_is_refused():
    """Case 4: a 5 MB prompt was accepted and tokenised."""
    with serve(CountingPolicy(), max_prompt_chars=100) as server, connect(server.url) as ws:
        ws.recv(timeout=10)
        reply = call(ws, {**request(), "prompt": "x" * 5_000_000})
        assert isinstance(reply, str) and "5000000 characters" in reply and "at most 100" in reply
        assert call(ws, {**request(), "prompt": "x" * 100})["actions"].shape == (3, 4)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def held_server(urls, release, stop, config: dict) -> None:
    """In its own process (so its memory is measured apart from the clients'): a server whose policy is held
    inside its first call until `release`."""
    with serve(CountingPolicy(hold=release), **config) as server:
        urls.put((server.url, server.server.config.memory_bound_mb))
        stop.wait(60)
        release.set()


def test_a_flood_of_large_requests_stays_within_the_memory_bound():
    """Case 5: three connections sending large requests without reading replies grew the server by 856 MB (the
    library read 16 frames ahead per connection). Here 3 x 30 requests of 1.9 MB go to a policy held inside its
    first call: unbounded, the server would hold ~170 MB of them; it may hold its stated bound."""
    context = multiprocessing.get_context("spawn")
    urls, release, stop = context.Queue(), context.Event(), context.Event()
    process = context.Process(target=held_server, args=(urls, release, stop, {"max_message_mb": 2,
                                                                             "max_connections": 4,
                                                                             "read_ahead": 1}))
    process.start()
    payload = pack({**request(), "padding": np.ones(int(1.9 * 2**20), np.uint8)})
    sent = [0, 0, 0]
    try:
        url, bound = urls.get(timeout=60)
        sockets = [connect(url, max_size=None).__enter__() for _ in sent]
        for ws in sockets:
            ws.recv(timeout=10)
        before = resident_mb(process.pid)

        def flood(index: int, ws) -> None:
            try:
                for _ in range(30):
                    ws.send(payload)
                    sent[index] += 1
            except (ConnectionClosed, OSError):
                pass

        for index, ws in enumerate(sockets):
            threading.Thread(target=flood, args=(index, ws), daemon=True).start()
        last, steady = None, 0
        for _ in range(200):  # until the senders stop making progress (the server stopped reading), <= 20 s
            time.sleep(0.1)
            steady = steady + 1 if sent == last else 0
            last = list(sent)
            if steady >= 10:
                break
        grown = resident_mb(process.pid) - before
        release.set()
        for ws in sockets:
            ws.close()
    finally:
        stop.set()
        process.join(30)
    assert sum(sent) < 90  # the senders were held back: the server stopped reading ahead
    assert grown < bound, f"{grown:.0f} MB held after {sum(sent)} requests were sent; bound {bound:.0f} MB"


def test_a_client_resets_only_its_own_episode():
    """Case 6: with one slot, another client's {"reset": true} restarted this client's episode."""
    with serve(CountingPolicy()) as server, connect(server.url) as a, connect(server.url) as b:
        a.recv(timeout=10), b.recv(timeout=10)
        assert [call(a, request())["actions"][0, 0] for _ in range(3)] == [1, 2, 3]
        assert call(b, {"reset": True}) == {"reset": True}
        assert call(a, request())["actions"][0, 0] == 4  # a's episode goes on
        assert call(a, {"reset": True}) == {"reset": True}
        assert call(a, request())["actions"][0, 0] == 1  # its own reset does reset it


def test_connections_are_capped_and_idle_ones_closed():
    with serve(CountingPolicy(), max_connections=2) as server:
        with connect(server.url) as a, connect(server.url) as b:
            a.recv(timeout=10), b.recv(timeout=10)
            with pytest.raises(InvalidStatus, match="503"):
                connect(server.url)
        for _ in range(200):  # the server sees both close (within 10 s)
            if not server.server.connections:
                break
            time.sleep(0.05)
        with connect(server.url) as c:  # places freed
            assert unpack(c.recv(timeout=10))["policy"] == "counting"
    with serve(CountingPolicy(), idle_timeout_s=0.5) as server, connect(server.url) as a:
        a.recv(timeout=10)
        with pytest.raises(ConnectionClosed) as closed:
            a.recv(timeout=10)  # nothing sent: closed as idle
        assert "idle" in closed.value.rcvd.reason and server.server.counters["idle_closed"] == 1


def test_duplicate_authorization_headers_and_browser_origins_are_refused_cleanly():
    """Case 7: two Authorization headers gave HTTP 500 with a traceback; any web page could connect."""
    with serve(CountingPolicy(), token="s3cret", allowed_origins=("http://localhost:3000",)) as server:
        good = {"Authorization": "Api-Key s3cret"}
        with pytest.raises(InvalidStatus, match="400"):
            connect(server.url, additional_headers=[("Authorization", "Api-Key s3cret")] * 2)
        with pytest.raises(InvalidStatus, match="401"):
            connect(server.url, additional_headers={"Authorization": "Api-Key wrong"})
        with pytest.raises(InvalidStatus, match="403"):
            connect(server.url, additional_headers=good, origin="http://evil.example")
        with connect(server.url, additional_headers=good, origin="http://localhost:3000") as ws:
            assert unpack(ws.recv(timeout=10))["policy"] == "counting"
        with connect(server.url, additional_headers=good) as ws:  # a robot's client sends no Origin
            assert unpack(ws.recv(timeout=10))["limits"]["max_prompt_chars"] == 1000


def test_beyond_loopback_a_token_is_required_and_it_need_not_be_on_the_command_line(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="host=0.0.0.0 is reachable from other machines and no token is set"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", allow_insecure=True).host == "0.0.0.0"
    assert ServeConfig(host="0.0.0.0", token="t").token == "t"
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    monkeypatch.delenv("VLA_SERVE_TOKEN", raising=False)
    with initialize_config_module("vla_runtime.configs", version_base="1.3"):
        assert read_token(compose("serve", overrides=[f"token_file={token_file}"])) == "from-a-file"
        monkeypatch.setenv("VLA_SERVE_TOKEN", "from-the-environment")
        assert read_token(compose("serve")) == "from-the-environment"
        with pytest.raises(UsageError, match="given twice"):
            read_token(compose("serve", overrides=[f"token_file={token_file}"]))
        monkeypatch.delenv("VLA_SERVE_TOKEN")
        with pytest.raises(UsageError, match="no such file"):
            read_token(compose("serve", overrides=[f"token_file={tmp_path / 'missing'}"]))
        assert read_token(compose("serve")) is None
    assert "VLA_SERVE_TOKEN" not in os.environ


def test_a_full_queue_waits_briefly_for_a_place_then_answers_busy_with_a_retry_hint():
    """Case 7, flood: instant "busy" replies let rejected clients spin against real inference."""
    release = threading.Event()
    policy = CountingPolicy(hold=release)
    with serve(policy, max_queue=1, busy_wait_ms=5000) as server, connect(server.url) as first, \
            connect(server.url) as second:
        first.recv(timeout=10), second.recv(timeout=10)
        first.send(pack(request()))
        assert policy.inside.wait(10)
        second.send(pack(request()))  # the queue is full: it waits for a place...
        time.sleep(0.2)
        release.set()  # ...which comes within busy_wait_ms: served, not refused
        assert unpack(first.recv(timeout=10))["actions"].shape == (3, 4)
        assert unpack(second.recv(timeout=10))["actions"].shape == (3, 4)
        assert server.server.counters["busy"] == 0
    release.clear()
    with serve(CountingPolicy(hold=release), max_queue=1, busy_wait_ms=50) as server, \
            connect(server.url) as first, connect(server.url) as second:
        first.recv(timeout=10), second.recv(timeout=10)
        first.send(pack(request()))
        reply = call(second, request())
        assert reply.startswith("busy: ") and "retry in ~" in reply
        release.set()
        first.recv(timeout=10)


def test_raw_garbage_never_takes_the_server_down():
    """A bounded fuzz: random bytes, truncated and mutated valid messages, all answered with text."""
    rng = np.random.default_rng(0)
    valid = pack(request())
    messages = [rng.bytes(int(rng.integers(1, 200))) for _ in range(100)]
    messages += [valid[: int(rng.integers(1, len(valid)))] for _ in range(100)]
    for _ in range(100):
        mutated = bytearray(valid)
        for position in rng.integers(0, len(valid), 4):
            mutated[position] = int(rng.integers(0, 256))
        messages.append(bytes(mutated))
    messages.append(msgpack.packb([[[[0]]]] * 10))
    with serve(CountingPolicy()) as server, connect(server.url) as ws:
        ws.recv(timeout=10)
        for message in messages:
            ws.send(message)
            reply = ws.recv(timeout=10)
            assert isinstance(reply, str) and len(reply) <= MAX_REPLY_CHARS or unpack(reply)["actions"].shape == (3, 4)
        assert call(ws, request())["actions"].shape == (3, 4)
