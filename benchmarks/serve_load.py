"""vla-serve under load on loopback, and what it answers to bad requests.

    python benchmarks/serve_load.py --clients 1 4 16 --seconds 60 --out benchmarks/serve

Starts `vla-serve policy=ref_dit` in its own process, waits for its first answer (warm), then for each N runs N
clients (openpi-client's WebsocketClientPolicy, one thread each) that send observations back to back for the
given time, while a poller asks /healthz every 50 ms. Reports per N: round-trip p50 / p99, answers per second,
error and busy answers, the server's resident memory before and after, and the health checks' latency. Then
sends one of each kind of bad request and records the reply, checking that a good request still gets actions.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from openpi_client.websocket_client_policy import WebsocketClientPolicy
from websockets.sync.client import connect

from vla_runtime.serve.protocol import pack, unpack


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(overrides: list[str], env: dict | None = None,
                 api_key: str | None = None) -> tuple[subprocess.Popen, str]:
    """`vla-serve` in its own process on a free loopback port, up and warm (one answer given): (process, url)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vla_runtime.cli.serve", f"port={port}", *overrides], env=env)
    url = f"ws://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            warm = WebsocketClientPolicy(url, api_key=api_key)
            warm.infer(observation(np.random.default_rng(0)))
            warm._ws.close()  # openpi-client has no close(): its connection would count against max_connections
            return server, url
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(1)


def observation(rng: np.random.Generator) -> dict:
    return {"observation/image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=4).astype(np.float32), "prompt": "close the drawer"}


def load(url: str, health_url: str, clients: int, seconds: float) -> dict:
    round_trips: list[float] = []
    failures: list[str] = []
    health: list[float] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(index: int) -> None:
        policy = WebsocketClientPolicy(url)
        obs = observation(np.random.default_rng(index))
        while not stop.is_set():
            started = time.perf_counter()
            try:
                policy.infer(obs)
            except RuntimeError as exc:  # the server's text answer: busy or an error
                with lock:
                    failures.append(str(exc).splitlines()[-1])
                continue
            with lock:
                round_trips.append(time.perf_counter() - started)

    def poll_health() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(health_url, timeout=5) as reply:
                assert reply.status == 200
            health.append(time.perf_counter() - started)
            stop.wait(0.05)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=poll_health))
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    ms = 1000 * np.asarray(round_trips)
    health_ms = 1000 * np.asarray(health)
    return {"clients": clients, "seconds": seconds, "answers": len(round_trips),
            "answers_per_s": len(round_trips) / seconds,
            "round_trip_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
            "busy": sum("busy" in f for f in failures), "errors": sum("busy" not in f for f in failures),
            "health_ms": {"p50": float(np.percentile(health_ms, 50)), "p99": float(np.percentile(health_ms, 99)),
                          "max": float(health_ms.max()), "checks": len(health)}}


BAD_REQUESTS = [
    ("text, not msgpack", "hello"),
    ("bytes that are not msgpack", b"\xc1\xc1\xc1"),
    ("a list instead of a dict", [1, 2]),
    ("no image", {"observation/state": np.zeros(4, np.float32), "prompt": "x"}),
    ("image 224x224 instead of 128x128", {"observation/image": np.zeros((224, 224, 3), np.uint8),
                                          "observation/state": np.zeros(4, np.float32), "prompt": "x"}),
    ("NaN in the state", {"observation/image": np.zeros((128, 128, 3), np.uint8),
                          "observation/state": np.array([0, np.nan, 0, 0], np.float32), "prompt": "x"}),
    ("an object array", {b"__ndarray__": True, b"data": b"", b"dtype": "|O", b"shape": [0]}),
    ("20 MB message (limit 16)", {"observation/image": np.zeros((20 * 2 ** 20,), np.uint8)}),
]


def bad_inputs(url: str) -> list[dict]:
    rows = []
    for what, message in BAD_REQUESTS:
        with connect(url, max_size=None) as ws:
            ws.recv(timeout=30)
            ws.send(message if isinstance(message, (str, bytes)) else pack(message))
            try:
                reply = ws.recv(timeout=30)
                answer = reply if isinstance(reply, str) else f"actions {unpack(reply)['actions'].shape}"
            except Exception as exc:  # a closed connection is the answer to an oversized message
                answer = f"connection closed: {exc}"
            rows.append({"request": what, "reply": answer})
    with connect(url) as ws:  # still up
        ws.recv(timeout=30)
        ws.send(pack(observation(np.random.default_rng(0))))
        rows.append({"request": "a good request afterwards",
                     "reply": f"actions {unpack(ws.recv(timeout=30))['actions'].shape}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--serve", default="policy=ref_dit num_threads=2 max_queue=16 max_connections=32",
                        help="vla-serve overrides")
    parser.add_argument("--out", default="benchmarks/serve")
    args = parser.parse_args()
    server, url = start_server(args.serve.split())
    health_url = url.replace("ws://", "http://") + "/healthz"
    try:
        runs = []
        for clients in args.clients:
            before = rss_mb(server.pid)
            run = load(url, health_url, clients, args.seconds)
            run["rss_mb"] = {"before": before, "after": rss_mb(server.pid)}
            runs.append(run)
            print(json.dumps(run), flush=True)
        bad = bad_inputs(url)
        assert server.poll() is None, "the server died"
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps({"serve": args.serve, "runs": runs, "bad_inputs": bad}, indent=2))
    lines = [f"# vla-serve on loopback: `vla-serve {args.serve}`", "",
             f"Command: `python benchmarks/serve_load.py --clients {' '.join(map(str, args.clients))} --seconds "
             f"{args.seconds:g} --out {args.out}`; clients are openpi-client threads on the same 2-core machine.", "",
             "| clients | answers / s | round trip p50 / p99 (ms) | errors | busy | /healthz p50 / p99 / max (ms) | "
             "server RSS before -> after (MB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['clients']} | {r['answers_per_s']:.1f} | {r['round_trip_ms']['p50']:.1f} / "
                     f"{r['round_trip_ms']['p99']:.1f} | {r['errors']} | {r['busy']} | {r['health_ms']['p50']:.1f} / "
                     f"{r['health_ms']['p99']:.1f} / {r['health_ms']['max']:.1f} | {r['rss_mb']['before']:.0f} -> "
                     f"{r['rss_mb']['after']:.0f} |")
    lines += ["", "Bad requests, one connection each (the server stays up):", "", "| request | reply |", "|---|---|"]
    lines += [f"| {row['request']} | {row['reply'].replace('|', '/')} |" for row in bad]
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
