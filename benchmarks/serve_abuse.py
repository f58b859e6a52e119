"""vla-serve attacked as an outside tester would (issue 28): the fault table and the flood figures.

    python benchmarks/serve_abuse.py --out benchmarks/serve

Starts `vla-serve policy=ref_dit num_threads=1 slots=1 max_queue=4` (its defaults otherwise) in its own process on
loopback and, while a poller asks /healthz every 20 ms:
- sends each bad request of the issue on a connection of its own, and records the reply (or how the connection
  closed), its length, the slowest /healthz answer meanwhile, and whether a good request then still gets actions;
- floods it: 600 distinct prompts at the length limit; 3 connections each sending 20 requests of 7.5 MB without
  reading replies while the policy computes; 30 connections at once. The server's resident memory before, at its
  peak and after, against its stated bound (`ServeConfig.memory_bound_mb`);
- checks episode isolation (client B's reset, then client A's next actions), then 20 openpi clients at once for
  --flood-seconds against one client alone: real answers, busy answers (at the defaults, where 12 of them are
  refused by max_connections, and again with all 20 connected);
- starts it twice more for the security defaults: with a token (VLA_SERVE_TOKEN) for duplicate Authorization
  headers and a browser Origin; on 0.0.0.0 without a token.
Writes abuse.json and abuse.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from serve_load import observation, rss_mb, start_server
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from vla_runtime.serve.protocol import pack, unpack

SERVE = ["policy=ref_dit", "num_threads=1", "slots=1", "max_queue=4"]


def generic(data, dtype):
    return {b"__npgeneric__": True, b"data": data, b"dtype": dtype}


def with_state(state) -> dict:
    return {**observation(np.random.default_rng(0)), "observation/state": state}


ATTACKS = [  # (issue case, request, message): the message as sent
    ("1", "state: -1 as a uint8 scalar", with_state(generic(-1, "|u1"))),
    ("1", "state: 300 as a uint8 scalar", with_state(generic(300, "|u1"))),
    ("1", "state: 2**64-1 as an int64 scalar", with_state(generic(2**64 - 1, "<i8"))),
    ("1", "state: \"abcd\"", with_state("abcd")),
    ("1", "state: {\"a\": 1}", with_state({"a": 1})),
    ("1", "state: [1, [2, 3], 4, 5]", with_state([1, [2, 3], 4, 5])),
    ("1", "state: [\"1\", \"2\", \"x\", \"4\"]", with_state(["1", "2", "x", "4"])),
    ("1", "state: 16 raw bytes", with_state(b"\x00" * 16)),
    ("2", "state: 700,000 floats (a list, 6.3 MB)", with_state([0.5] * 700_000)),
    ("2", "state: 1,500,000 float32 (an array, 6 MB)", with_state(np.full(1_500_000, 0.5, np.float32))),
    ("4", "prompt: 5 MB", {**observation(np.random.default_rng(0)), "prompt": "x" * 5_000_000}),
    ("-", "20 MB message (limit 8)", {"observation/image": np.zeros(20 * 2**20, np.uint8)}),
    ("-", "text frame", "hello"),
    ("-", "random bytes", np.random.default_rng(1).bytes(64)),
]


class HealthPoller:
    """Asks /healthz every 20 ms; `worst()` is the slowest answer since the last call."""

    def __init__(self, url: str):
        self.url = url.replace("ws://", "http://") + "/healthz"
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=30) as reply:
                reply.read()
            self.times.append(time.perf_counter() - started)
            self.stop.wait(0.02)

    def worst(self) -> float:
        times, self.times = self.times, []
        return 1000 * max(times, default=0.0)


def attack(url: str, message) -> dict:
    with connect(url, max_size=None) as ws:
        ws.recv(timeout=30)
        sent = time.perf_counter()
        ws.send(message if isinstance(message, str | bytes) else pack(message))
        try:
            reply = ws.recv(timeout=60)
            reply_s = time.perf_counter() - sent
        except ConnectionClosed as exc:
            return {"outcome": f"closed {exc.rcvd.code if exc.rcvd else '-'} ({exc.rcvd.reason if exc.rcvd else ''})",
                    "reply_chars": 0, "reply_s": time.perf_counter() - sent, "still_works": None}
        outcome = reply if isinstance(reply, str) else f"actions {unpack(reply)['actions'].shape}"
        ws.send(pack(observation(np.random.default_rng(2))))
        works = not isinstance(ws.recv(timeout=60), str)
        return {"outcome": outcome, "reply_chars": len(reply), "reply_s": reply_s, "still_works": works}


def fault_table(url: str, poller: HealthPoller) -> list[dict]:
    rows = []
    for case, what, message in ATTACKS:
        poller.worst()
        row = {"case": case, "request": what, **attack(url, message), "healthz_max_ms": poller.worst()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def peak_rss(pid: int, action) -> dict:
    """The server's resident memory before, at its peak while `action()` runs, and after it."""
    before, peak, done = rss_mb(pid), [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = action()
    done.set()
    watcher.join()
    time.sleep(1.0)
    return {"rss_mb": {"before": before, "peak": peak[0], "after": rss_mb(pid)}, **(result or {})}


def prompt_flood(url: str) -> dict:
    with connect(url) as ws:
        ws.recv(timeout=30)
        for index in range(600):
            prompt = f"{index:04d} " + "close the drawer " * 58  # 990 characters, under the limit of 1000
            ws.send(pack({**observation(np.random.default_rng(0)), "prompt": prompt}))
            assert not isinstance(ws.recv(timeout=60), str)
    return {"requests": 600}


def message_flood(url: str) -> dict:
    """3 connections, each 20 x 7.5 MB without reading a reply."""
    payload = pack({**observation(np.random.default_rng(0)), "padding": np.ones(int(7.5 * 2**20), np.uint8)})
    sent = [0, 0, 0]
    sockets = [connect(url, max_size=None).__enter__() for _ in sent]
    for ws in sockets:
        ws.recv(timeout=30)

    def flood(index: int) -> None:
        try:
            for _ in range(20):
                sockets[index].send(payload)
                sent[index] += 1
        except (ConnectionClosed, OSError):
            pass

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    time.sleep(2.0)
    for ws in sockets:
        ws.close()
    return {"requests_sent": sum(sent)}


def connection_flood(url: str) -> dict:
    opened, refused = [], 0
    for _ in range(30):
        try:
            ws = connect(url).__enter__()
            ws.recv(timeout=30)
            opened.append(ws)
        except InvalidStatus:
            refused += 1
    for ws in opened:
        ws.close()
    return {"accepted": len(opened), "refused_503": refused}


def isolation(url: str) -> dict:
    obs = observation(np.random.default_rng(3))
    with connect(url) as a, connect(url) as b:
        a.recv(timeout=30), b.recv(timeout=30)
        chunks = []
        for _ in range(3):
            a.send(pack(obs))
            chunks.append(unpack(a.recv(timeout=60))["actions"])
        b.send(pack({"reset": True}))
        b.recv(timeout=30)
        a.send(pack(obs))
        fourth = unpack(a.recv(timeout=60))["actions"]
    # The same observation: a reset policy repeats its first noise, hence its first chunk.
    return {"a_reset_by_b": bool(np.array_equal(fourth, chunks[0]))}


def client_flood(url: str, clients: int, seconds: float) -> dict:
    answers, busy, errors, refused = [0], [0], [0], [0]
    stop, lock = threading.Event(), threading.Lock()

    def client(index: int) -> None:
        try:
            policy = WebsocketClientPolicy(url)
        except InvalidStatus:  # over max_connections: 503
            with lock:
                refused[0] += 1
            return
        obs = observation(np.random.default_rng(index))
        while not stop.is_set():
            try:
                policy.infer(obs)
                counter = answers
            except RuntimeError as exc:
                counter = busy if "busy" in str(exc) else errors
            with lock:
                counter[0] += 1
        policy._ws.close()  # openpi-client has no close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    return {"clients": clients, "refused_503": refused[0], "seconds": seconds, "answers": answers[0],
            "answers_per_s": answers[0] / seconds, "busy": busy[0], "errors": errors[0]}


def security() -> list[dict]:
    rows = []
    env = {**os.environ, "VLA_SERVE_TOKEN": "s3cret"}
    server, url = start_server(SERVE, env=env, api_key="s3cret")
    try:
        for what, options in (("two Authorization headers", {"additional_headers": [("Authorization",
                                                                                     "Api-Key s3cret")] * 2}),
                              ("no Authorization", {}),
                              ("a browser Origin (http://evil.example)", {
                                  "additional_headers": {"Authorization": "Api-Key s3cret"},
                                  "origin": "http://evil.example"}),
                              ("the token", {"additional_headers": {"Authorization": "Api-Key s3cret"}})):
            try:
                with connect(url, **options) as ws:
                    ws.recv(timeout=30)
                    outcome = "accepted"
            except InvalidStatus as exc:
                outcome = f"HTTP {exc.response.status_code}: {exc.response.body.decode().strip()}"
            rows.append({"request": what, "outcome": outcome})
    finally:
        server.terminate()
        server.wait(timeout=30)
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "vla_runtime.cli.serve", "host=0.0.0.0", *SERVE],
                         capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "VLA_SERVE_TOKEN"})
    rows.append({"request": "vla-serve host=0.0.0.0 without a token",
                 "outcome": f"exit {run.returncode} after {time.perf_counter() - started:.1f} s: "
                            f"{run.stderr.strip().splitlines()[-1]}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood-seconds", type=float, default=20)
    parser.add_argument("--out", default="benchmarks/serve")
    args = parser.parse_args()
    server, url = start_server(SERVE)
    poller = HealthPoller(url)
    from vla_runtime.serve.server import ServeConfig

    bound = ServeConfig().memory_bound_mb
    try:
        faults = fault_table(url, poller)
        floods = {}
        for name, action in (("30 connections at once", connection_flood),
                             ("600 distinct prompts of 990 characters", prompt_flood),
                             ("3 connections x 20 requests of 7.5 MB, replies unread", message_flood)):
            poller.worst()
            floods[name] = {**peak_rss(server.pid, lambda action=action: action(url)),
                            "healthz_max_ms": poller.worst()}
            print(name, json.dumps(floods[name]), flush=True)
        isolated = isolation(url)
        alone = client_flood(url, 1, args.flood_seconds)
        crowd_at_defaults = client_flood(url, 20, args.flood_seconds)
        assert server.poll() is None, "the server died"
    finally:
        poller.stop.set()
        server.terminate()
        server.wait(timeout=30)
    # The same 20 clients all connected (max_connections=32): what "busy" does to a flood.
    server, url = start_server([*SERVE, "max_connections=32"])
    try:
        crowd = client_flood(url, 20, args.flood_seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    secure = security()
    results = {"serve": SERVE, "memory_bound_mb": bound, "faults": faults, "floods": floods, "isolation": isolated,
               "client_flood": [alone, crowd_at_defaults, crowd], "security": secure}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "abuse.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "abuse.md").write_text(markdown(results, args))
    print(markdown(results, args))


def markdown(results: dict, args) -> str:
    lines = [f"# vla-serve under attack: `vla-serve {' '.join(SERVE)}` (defaults otherwise), loopback", "",
             f"Command: `python benchmarks/serve_abuse.py --flood-seconds {args.flood_seconds:g} --out {args.out}` "
             "(server, attacker and a /healthz poller every 20 ms on the same 2 cores).", "",
             "| issue case | request | outcome | reply chars | answered in | slowest /healthz meanwhile | "
             "next good request |", "|---|---|---|---:|---:|---:|---|"]
    for row in results["faults"]:
        works = {True: "actions", False: "error", None: "-"}[row["still_works"]]
        lines.append(f"| {row['case']} | {row['request']} | {row['outcome'][:110].replace('|', '/')} | "
                     f"{row['reply_chars']} | {1000 * row['reply_s']:.0f} ms | {row['healthz_max_ms']:.0f} ms | "
                     f"{works} |")
    lines += ["", f"Floods (issue cases 3-5); the stated bound on what requests hold: "
              f"{results['memory_bound_mb']:.0f} MB (`max_connections x (read_ahead + 4) x max_message_mb`):", "",
              "| flood | outcome | server RSS before / peak / after | slowest /healthz |", "|---|---|---:|---:|"]
    for name, flood in results["floods"].items():
        outcome = ", ".join(f"{k} {v}" for k, v in flood.items() if k not in ("rss_mb", "healthz_max_ms"))
        rss = flood["rss_mb"]
        lines.append(f"| {name} | {outcome} | {rss['before']:.0f} / {rss['peak']:.0f} / {rss['after']:.0f} MB | "
                     f"{flood['healthz_max_ms']:.0f} ms |")
    alone, at_defaults, crowd = results["client_flood"]
    reset = "yes" if results["isolation"]["a_reset_by_b"] else "no"
    lines += ["", f"Case 6: client B's `{{\"reset\": true}}` reset client A's episode: {reset} (A's 4th chunk vs "
              "its 1st, same observation).",
              "", f"Case 7, flood of openpi clients sending back to back for {alone['seconds']:g} s each: "
              f"1 client alone {alone['answers_per_s']:.1f} answers / s; 20 clients at the defaults: "
              f"{at_defaults['refused_503']} refused (503, max_connections), the others "
              f"{at_defaults['answers_per_s']:.1f} answers / s ({at_defaults['busy']} busy replies); 20 clients all "
              f"connected (`max_connections=32`): {crowd['answers_per_s']:.1f} answers / s ({crowd['answers']} "
              f"answers, {crowd['busy']} busy replies, {crowd['errors']} errors).", "",
              "Security defaults:", "", "| request | outcome |", "|---|---|"]
    lines += [f"| {row['request']} | {row['outcome'].replace('|', '/')} |" for row in results["security"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
