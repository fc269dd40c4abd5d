"""HTTP serving throughput and latency: `lorafit serve` against the server a user would write.

Both servers run as uvicorn subprocesses on a free loopback port (nothing listens beyond 127.0.0.1). A fixed
number of requests, one text each (the run's bundled test texts, cycled), is sent by N concurrent async httpx
clients for each concurrency level; every server is stopped with SIGTERM at the end. Prints texts/s and p50 / p95 /
p99 latency per server and level, and lorafit's ratios to the peer; saves bench/out/serve.json.

Servers
  lorafit   `lorafit serve RUN` (backend auto: the fastest the run has; dynamic batching)
  peer      a FastAPI endpoint calling a transformers pipeline per request on the merged model (`lorafit merge`):
            pipeline("text-classification") for a cls-pooling run; for a mean-pooling run (the default, for which
            Transformers has no classification class) pipeline("feature-extraction") + the merged README's mean
            pooling and head. A plain `def` endpoint, as users write it: FastAPI runs it in its thread pool.

    python bench/serve.py --run runs/<run>                                    # 512 requests at 1, 8, 64 clients
    python bench/serve.py --run runs/<run> --requests 16 --concurrency 1,4    # a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pydantic import BaseModel  # noqa: E402

from common import command_line  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
HOST = "127.0.0.1"  # loopback only


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, timeout: float = 600):
    """Start a server subprocess, wait for it to answer, yield its URL; SIGTERM (then kill) at the end."""
    import httpx

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}: {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready after {timeout:.0f}s: {' '.join(cmd)}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def post_json(reader, writer, host: str, path: str, body: bytes) -> int:
    """One HTTP/1.1 keep-alive POST on an open connection; returns the status. Written on asyncio streams rather
    than httpx because httpx cost ~16 ms of CPU per request here, and the load generator shares the 2 cores with
    the server it measures: on this machine an httpx client alone capped any server near 60 requests/s."""
    writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (path.encode(), host.encode(), len(body), body))
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = None
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise RuntimeError("chunked responses are not expected from these servers")
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(length)
    return status


async def load(url: str, texts: list[str], requests: int, concurrency: int, timeout: float) -> dict:
    """`requests` POST /predict calls, one text each, from `concurrency` keep-alive connections; latencies in
    seconds. Also measures the CPU time the load generator itself used."""
    import numpy as np

    host, port = url.split("//")[1].split(":")
    bodies = [json.dumps({"inputs": t}).encode() for t in texts]
    latencies: list[float] = []
    failures = 0
    next_index = iter(range(requests))

    async def client() -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            await post_json(reader, writer, host, "/predict", bodies[0])  # warm-up: the connection, lazy setup
            await ready.wait()  # every client connected and warm: the clock starts
            for i in next_index:
                t0 = time.perf_counter()
                try:
                    status = await asyncio.wait_for(post_json(reader, writer, host, "/predict", bodies[i % len(bodies)]),
                                                    timeout)
                except (asyncio.TimeoutError, OSError, RuntimeError, ValueError, IndexError):
                    failures += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                latencies.append(time.perf_counter() - t0)
                failures += status != 200
        finally:
            writer.close()

    ready = asyncio.Barrier(concurrency + 1)
    clients = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.wait_for(ready.wait(), timeout)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*clients)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    ms = np.asarray(latencies) * 1000
    return {"concurrency": concurrency, "requests": requests, "failures": failures, "seconds": round(seconds, 3),
            "texts_per_s": round(requests / seconds, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p95_ms": round(float(np.percentile(ms, 95)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "load_generator_cpu_ms_per_request": round(1000 * cpu / requests, 2)}


class PeerBody(BaseModel):  # at module level: FastAPI resolves endpoint annotations in the module's globals
    inputs: str


def peer_app(merged: str, max_length: int):
    """The server a user writes around a transformers pipeline, on the merged model directory."""
    import numpy as np
    import torch
    from fastapi import FastAPI
    from transformers import pipeline

    merged_dir = Path(merged)
    mean_pooling = (merged_dir / "head.safetensors").is_file()
    if mean_pooling:
        from safetensors.torch import load_file

        extractor = pipeline("feature-extraction", model=merged, tokenizer=merged, device="cpu")
        head = {k: v.numpy() for k, v in load_file(merged_dir / "head.safetensors").items()}
        labels = extractor.model.config.id2label
    else:
        classifier = pipeline("text-classification", model=merged, tokenizer=merged, device="cpu", top_k=None)

    app = FastAPI()

    @app.get("/readyz")
    def ready():
        return {"status": "ready"}

    @app.post("/predict")
    def predict(body: PeerBody):
        if not mean_pooling:
            out = classifier(body.inputs, truncation=True, max_length=max_length)
            return out[0] if out and isinstance(out[0], list) else out
        with torch.inference_mode():
            hidden = extractor(body.inputs, return_tensors=True, tokenize_kwargs={"truncation": True,
                                                                                 "max_length": max_length})
        logits = hidden[0].numpy().mean(0) @ head["weight"].T + head["bias"]  # one text: no padding to mask
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        return [{"label": labels[int(j)], "score": float(probs[j])} for j in np.argsort(-probs)]

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="A completed run directory.")
    ap.add_argument("--requests", type=int, default=512, help="Requests per server and concurrency level.")
    ap.add_argument("--concurrency", default="1,8,64", help="Comma-separated numbers of concurrent clients.")
    ap.add_argument("--backend", default="auto", help="lorafit serve --backend (auto: the fastest the run has).")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--forward-batch-size", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--no-peer", action="store_true", help="Only lorafit serve.")
    ap.add_argument("--timeout", type=float, default=300, help="Seconds per request before it counts as failed.")
    ap.add_argument("--peer-server", help=argparse.SUPPRESS)  # internal: run the peer server on a merged model dir
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-length", type=int, default=128, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.peer_server:
        import uvicorn

        uvicorn.run(peer_app(args.peer_server, args.max_length), host=HOST, port=args.port, log_level="warning")
        return
    if args.run is None:
        ap.error("--run RUN is required (train one with `lorafit train`)")

    import pandas as pd

    import lorafit
    from lorafit.export import merge

    run_dir = args.run
    cfg = lorafit.Config.from_yaml(run_dir / "config.yaml")
    texts = pd.read_csv(run_dir / "test_predictions.csv", dtype={"text": str}, keep_default_na=False)["text"].tolist()
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    servers: dict[str, list[str]] = {}
    port = free_port()
    servers["lorafit"] = [sys.executable, "-m", "lorafit.cli", "serve", str(run_dir), "--host", HOST, "--port", str(port),
                          "--backend", args.backend, "--max-batch-size", str(args.max_batch_size),
                          "--forward-batch-size", str(args.forward_batch_size), "--max-wait-ms",
                          str(args.max_wait_ms), "--max-queue", str(max(1024, 4 * max(levels)))]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if not args.no_peer:
            merged = Path(tmp) / "merged"
            merge(run_dir, merged)
            servers["peer"] = [sys.executable, __file__, "--peer-server", str(merged), "--port", str(free_port()),
                               "--max-length", str(cfg.data.max_length)]
        rows: dict[str, list[dict]] = {}
        labels: dict[str, list[str]] = {}
        for name, cmd in servers.items():
            port = int(cmd[cmd.index("--port") + 1])
            with server(cmd, port) as url:
                import httpx

                backend = httpx.get(f"{url}/v1/model").json()["backend"] if name == "lorafit" else ""
                # the same answers, or the comparison is void: top labels on the first texts, compared below
                labels[name] = [httpx.post(f"{url}/predict", json={"inputs": t}, timeout=args.timeout).json()[0]["label"]
                                for t in texts[:32]]
                rows[name] = []
                for c in levels:
                    row = asyncio.run(load(url, texts, args.requests, c, args.timeout))
                    row["backend"] = backend
                    rows[name].append(row)
                    if row["failures"]:
                        print(f"  warning: {row['failures']} of {row['requests']} requests to {name} failed", flush=True)
                    print(f"  {name:8s} {c:3d} clients {row['texts_per_s']:8.1f} texts/s  p50 {row['p50_ms']:7.1f}  "
                          f"p95 {row['p95_ms']:7.1f}  p99 {row['p99_ms']:7.1f} ms  failures {row['failures']}  "
                          f"load generator {row['load_generator_cpu_ms_per_request']} CPU ms/request", flush=True)

    print(f"\nrun {run_dir}: {args.requests} requests of one text per level, {os.cpu_count()} cores "
          f"(lorafit backend {rows['lorafit'][0]['backend']}, max batch {args.max_batch_size}, forwards of {args.forward_batch_size}, wait {args.max_wait_ms} ms)")
    agreement = None
    if "peer" in labels:
        agreement = sum(a == b for a, b in zip(labels["lorafit"], labels["peer"])) / len(labels["peer"])
        print(f"top labels of the peer agree with lorafit's on {100 * agreement:.1f}% of {len(labels['peer'])} texts")
    print(f"{'server':9s} {'clients':>7s} {'texts/s':>9s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} "
          f"{'x peer texts/s':>15s} {'p99 / peer':>11s}")
    for name, level_rows in rows.items():
        for i, r in enumerate(level_rows):
            peer = rows.get("peer", [None] * len(levels))[i]
            ratio = f"{r['texts_per_s'] / peer['texts_per_s']:.2f}" if peer and name != "peer" else ""
            p99 = f"{r['p99_ms'] / peer['p99_ms']:.2f}" if peer and name != "peer" else ""
            if ratio:
                r["ratio_to_peer"], r["p99_ratio_to_peer"] = float(ratio), float(p99)
            print(f"{name:9s} {r['concurrency']:7d} {r['texts_per_s']:9.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
                  f"{r['p99_ms']:8.1f} {ratio:>15s} {p99:>11s}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run_dir), "pooling": cfg.model.pooling, "requests": args.requests, "concurrency": levels,
              "cpu_count": os.cpu_count(), "max_batch_size": args.max_batch_size,
              "forward_batch_size": args.forward_batch_size, "max_wait_ms": args.max_wait_ms,
              "label_agreement_with_peer": agreement, "results": rows, "command": command_line()}
    (OUT / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {OUT / 'serve.json'}")


if __name__ == "__main__":
    main()
