"""``effx serve`` under load, beside llama.cpp's server (llama-cpp-python[server]) on the same GGUF file, in
one run.

Each server runs in a subprocess on a free localhost port. For 1, 4 and 16 concurrent clients (``--clients``),
``--requests`` chat requests (``effx.data.PROMPTS``, round robin) are sent, greedy, ``--max-tokens`` each,
streamed, at most ``c`` in flight. Per server and load: aggregate completion tokens/s (the answers' text
re-tokenized with SmolLM2's tokenizer, the same count for both servers), its ratio to one client's,
p50/p95 time to first token and p50/p95 time between streamed chunks. Both servers get ``--threads``
threads. effx runs ``--passes`` (default ``quantize{source=gguf}``: the GGUF file's own 4-bit values)
with continuous batching up to 16 rows; llama-cpp-python's server decodes one request at a time. With
``--replicas N``, effx serve also runs as N replicas on Ray Serve (``effx serve --replicas``), each with one
CPU and one thread, behind Ray's proxy.

    python benchmarks/serve.py                                  # 1, 4, 16 clients, 32 requests of 64 tokens
    python benchmarks/serve.py --clients 1,4 --requests 8 --no-llama-cpp
    python benchmarks/serve.py --replicas 2                     # and 2 Ray Serve replicas of 1 thread each
    pip install -e ".[llama]"             # the peer, llama-cpp-python[server] (a source build of a few minutes)

Without llama-cpp-python[server] its rows are left out, and the script says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx

import effx
from effx.data import PROMPTS
from effx.kernels import describe
from effx.models import gguf_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(argv: list[str], port: int, health: str, env: dict, timeout: float = 600.0):
    """Run ``argv`` (with ``env`` added) until the block ends; wait until ``health`` answers 200 first."""
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a server's log must never block it
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise SystemExit(f"{argv[:4]} exited: {log.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}{health}", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{argv[:4]} did not answer {health} in {timeout:.0f} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _one(base: str, model: str, prompt: str, max_tokens: int) -> tuple[float, float, list[float], str]:
    """One streamed chat request: (seconds in all, time to first token, gaps between chunks, text)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first, last, gaps, text = None, None, [], []
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            if not piece:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
            text.append(piece)
    return time.perf_counter() - start, first or 0.0, gaps, "".join(text)


def _load(base: str, model: str, clients: int, requests: int, max_tokens: int, count) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda p: _one(base, model, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    tokens = sum(count(r[3]) for r in results)
    ttft = sorted(r[1] for r in results)
    gaps = sorted(g for r in results for g in r[2]) or [0.0]

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {
        "tok/s": tokens / wall,
        "ttft50": statistics.median(ttft),
        "ttft95": pct(ttft, 0.95),
        "gap50": statistics.median(gaps),
        "gap95": pct(gaps, 0.95),
        "tokens": tokens,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    ap.add_argument("--requests", type=int, default=32, help="requests per load")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--passes", default="quantize{source=gguf}", help="effx's pipeline")
    ap.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp's server out")
    ap.add_argument("--no-effx", action="store_true", help="leave effx serve out (llama.cpp's rows only)")
    ap.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="also time effx serve as N replicas on Ray Serve, 1 CPU and thread each (the ray extra)",
    )
    args = ap.parse_args()
    loads = [int(c) for c in args.clients.split(",")]
    _, tok = effx.models.load("smollm2-135m")

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False).input_ids)

    gguf = str(gguf_file("smollm2-135m"))
    servers = {}
    port = free_port()
    if not args.no_effx:
        servers[f"effx serve ({args.passes or 'dense'}, max batch 16)"] = (
            [sys.executable, "-m", "effx.cli", "serve", "--model", "smollm2-135m", "--port", str(port)]
            + (["--passes", args.passes] if args.passes else [])
            + ["--max-batch", "16", "--max-queue", str(max(64, args.requests))],
            port,
            "/health",
            {"OMP_NUM_THREADS": str(args.threads)},
        )
    if args.replicas and importlib.util.find_spec("ray") is None:
        print('Ray Serve rows left out: pip install -e ".[ray]"')
    elif args.replicas and not args.no_effx:
        port = free_port()
        servers[f"effx serve, {args.replicas} Ray Serve replicas x 1 thread"] = (
            [sys.executable, "-m", "effx.cli", "serve", "--model", "smollm2-135m", "--port", str(port)]
            + (["--passes", args.passes] if args.passes else [])
            + ["--max-batch", "16", "--max-queue", str(max(64, args.requests))]
            + ["--replicas", str(args.replicas), "--replica-cpus", "1"],
            port,
            "/health",
            {},
        )
    if args.no_llama_cpp:
        pass
    elif importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        print('llama.cpp rows left out: pip install -e ".[llama]" (llama-cpp-python[server])')
    else:
        port = free_port()
        servers["llama.cpp server (the GGUF file, Q4_1)"] = (
            [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port)]
            # its default interrupts a running stream when another request comes: serve them in turn
            + ["--n_threads", str(args.threads), "--n_ctx", "2048", "--interrupt_requests", "False"],
            port,
            "/v1/models",
            {},
        )
    print(
        f"SmolLM2-135M, {args.requests} chat requests of {args.max_tokens} greedy tokens per load, streamed, "
        f"{args.threads} threads; {describe()}"
    )
    print(
        f"{'server':48} {'clients':>7} {'tok/s':>7} {'x 1':>5} {'ttft p50':>9} {'p95':>6} {'gap p50':>8} {'p95':>6}"
    )
    for name, (argv, port, health, env) in servers.items():
        with running_server(argv, port, health, env) as base:
            model = "smollm2-135m" if "effx" in name else gguf
            _one(base, model, PROMPTS[0], 8)  # warm-up
            one = None
            for c in loads:
                r = _load(base, model, c, args.requests, args.max_tokens, count)
                one = one or r["tok/s"]
                print(
                    f"{name:48} {c:7d} {r['tok/s']:7.1f} {r['tok/s'] / one:5.2f} {r['ttft50']:9.3f} "
                    f"{r['ttft95']:6.3f} {r['gap50'] * 1e3:7.1f}m {r['gap95'] * 1e3:5.1f}m"
                )


if __name__ == "__main__":
    main()
