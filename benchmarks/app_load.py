"""Load test of the web app: ``groundseg demo`` in its own process, N concurrent gradio_client clients on
loopback for T seconds, each calling /click (and every k-th call /ground). Reports requests, failures (must
be 0) and latency percentiles per endpoint; exits non-zero on any failure.

    python benchmarks/app_load.py [--clients 20] [--seconds 30] [--ground-every 10] [--model DIR]

Latency is client-side: upload of the image + queue wait + model call + result download. Model calls run one
at a time (the app's queue), so with many clients the latency is mostly queue wait; the throughput column is
what the server sustains.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Please segment the circle below the cyan shape."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path | None, port: int, timeout_s: float = 180.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "apps.cli", "demo", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    if model is not None:
        cmd += ["--model", str(model)]
    server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the app exited with code {server.returncode}: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the app did not answer on port {port} within {timeout_s:.0f} s")


def client_loop(url: str, image: str, stop_at: float, ground_every: int, seed: int, out: list, lock) -> None:
    from gradio_client import Client, handle_file

    rng = np.random.default_rng(seed)
    records = []
    try:
        client = Client(url, verbose=False)
    except Exception as err:  # counted as one failure of this client
        with lock:
            out.append(("connect", 0.0, f"{type(err).__name__}: {err}"))
        return
    calls = 0
    while time.monotonic() < stop_at:
        calls += 1
        ground = ground_every > 0 and calls % ground_every == 0
        endpoint = "/ground" if ground else "/click"
        t0 = time.perf_counter()
        error = None
        try:
            if ground:
                result = client.predict(handle_file(image), QUESTION, 32, None, None, None, api_name="/ground")
            else:
                x, y = (float(v) for v in rng.integers(20, 380, 2))
                result = client.predict(handle_file(image), x, y, 1, api_name="/click")
            if not isinstance(result, dict) or "targets" not in result:
                error = f"unexpected result {str(result)[:80]!r}"
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
        records.append((endpoint, time.perf_counter() - t0, error))
    with lock:
        out.extend(records)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--ground-every", type=int, default=10, help="every k-th call of a client is /ground (0: never)")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the embedded shapes-tiny)")
    ap.add_argument("--image", type=Path, default=ROOT / "examples" / "shapes.png")
    args = ap.parse_args()

    port = free_port()
    t_start = time.perf_counter()
    server = start_server(args.model, port)
    print(f"app ready on 127.0.0.1:{port} after {time.perf_counter() - t_start:.1f} s", flush=True)
    records: list = []
    lock = threading.Lock()
    try:
        stop_at = time.monotonic() + args.seconds
        threads = [threading.Thread(target=client_loop, args=(f"http://127.0.0.1:{port}/", str(args.image), stop_at,
                                                              args.ground_every, i, records, lock))
                   for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    report(records, wall, args)
    failures = [r for r in records if r[2] is not None]
    if failures:
        for endpoint, _, error in failures[:5]:
            print(f"  failure on {endpoint}: {error}")
        raise SystemExit(f"{len(failures)} failed requests")


def report(records: list, wall: float, args) -> None:
    by_endpoint: dict[str, list] = defaultdict(list)
    for record in records:
        by_endpoint[record[0]].append(record)
    print(f"\napp load: {args.clients} gradio_client clients for {args.seconds:.0f} s on loopback "
          f"({wall:.1f} s until the last request returned)")
    row = "| {:9} | {:>8} | {:>8} | {:>6} | {:>8} | {:>8} | {:>8} |"
    header = row.format("endpoint", "requests", "failures", "req/s", "p50 ms", "p90 ms", "p99 ms")
    print(header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = sorted(by_endpoint.items()) + [("all", records)]
    for name, rows_ in rows:
        ok = np.array([r[1] for r in rows_ if r[2] is None]) * 1000
        fails = sum(r[2] is not None for r in rows_)
        p50, p90, p99 = (np.percentile(ok, q) if len(ok) else float("nan") for q in (50, 90, 99))
        print(row.format(name, len(rows_), fails, f"{len(rows_) / wall:.1f}", f"{p50:.0f}", f"{p90:.0f}", f"{p99:.0f}"))


if __name__ == "__main__":
    main()
