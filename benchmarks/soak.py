"""A bounded soak of ``effx serve``: ``--clients`` clients send mixed requests for ``--minutes`` and leave
some of them early; every answer is checked.

Each client loops: chat or text completion, streamed or whole, greedy or sampled (temperature 0.7, a seed),
1 to ``--max-tokens`` new tokens, sometimes a stop string. About ``--cancel`` of the streams are dropped
after a random number of chunks, and of the whole answers after a random fraction of a second (the client
closes the connection). A 429 (queue full) is retried after its ``Retry-After``. The server runs with a
small batch and queue (``--max-batch``, ``--max-queue``), so that requests queue, are refused and cancel
while they wait.

Checked, and counted per outcome:

* every answer that is not cancelled by its client is a 200 with a finish reason (a stream ends in
  ``[DONE]``), or a 429 with ``Retry-After``, or the documented overload 503; anything else is a failure,
  and so is a request that gets no answer in ``--timeout`` seconds (a lost request);
* a probe (one greedy chat request) gives the same text before, every minute during, and after the soak:
  cancellations and refusals leave no trace in the running batch;
* after the soak, ``/health`` answers, ``/metrics`` shows an empty queue and batch, and its counts of
  answers by status agree with what the clients saw.

    python benchmarks/soak.py                         # 10 minutes, 8 clients, SmolLM2 quantize{source=gguf}
    python benchmarks/soak.py --minutes 1 --clients 4 --passes ""

The exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import threading
import time
from collections import Counter

import httpx
from serve import free_port, running_server

from effx.data import PROMPTS
from effx.kernels import describe

MODEL = "smollm2-135m"


class Tally:
    """Outcomes across clients (thread-safe), and the failures' details."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []

    def add(self, outcome: str, status: int | None = None, failure: str | None = None) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if status is not None:
                self.statuses[status] += 1
            if failure:
                self.failures.append(failure)


def _body(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    prompt = rng.choice(PROMPTS)
    body: dict = {"model": MODEL, "max_tokens": rng.randint(1, max_tokens), "stream": rng.random() < 0.6}
    if rng.random() < 0.5:
        body.update(temperature=0.7, seed=rng.randrange(1 << 30))
    else:
        body["temperature"] = 0
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(["\n", ".", " the"])]
    if rng.random() < 0.7:
        return "/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}
    return "/completions", {**body, "prompt": prompt}


def _request(http: httpx.Client, base: str, path: str, body: dict, cancel_after: float | None, tally: Tally):
    """Send one request; ``cancel_after``: leave after that many chunks (streamed) or seconds (whole)."""
    what = f"{path} stream={body['stream']} max_tokens={body['max_tokens']}"
    try:
        if body["stream"]:
            with http.stream("POST", base + path, json=body) as r:
                if r.status_code != 200:
                    return _refused(r, what, tally)
                chunks, done, reason = 0, False, None
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    data = json.loads(line[6:])
                    if "error" in data:
                        tally.add("failed", 200, f"{what}: error in the stream: {data['error']}")
                        return
                    reason = data["choices"][0].get("finish_reason") or reason
                    chunks += 1
                    if cancel_after is not None and chunks >= cancel_after:
                        tally.add("cancelled", 200)
                        return  # leaving the block closes the connection
                if done and reason in ("stop", "length"):
                    tally.add("completed", 200)
                else:
                    tally.add("failed", 200, f"{what}: the stream ended without [DONE] or a finish reason")
                return
        timeout = httpx.Timeout(http.timeout.read, read=cancel_after) if cancel_after else http.timeout
        r = http.post(base + path, json=body, timeout=timeout)
        if r.status_code != 200:
            return _refused(r, what, tally)
        if r.json()["choices"][0]["finish_reason"] in ("stop", "length"):
            tally.add("completed", 200)
        else:
            tally.add("failed", 200, f"{what}: no finish reason: {r.text[:200]}")
    except httpx.ReadTimeout:
        if cancel_after is not None and not body["stream"]:
            tally.add("cancelled")
        else:
            tally.add("failed", None, f"{what}: no answer in {http.timeout.read} s (lost)")
    except httpx.HTTPError as e:
        tally.add("failed", None, f"{what}: {type(e).__name__}: {e}")


def _refused(r: httpx.Response, what: str, tally: Tally) -> None:
    r.read()
    if r.status_code == 429 and r.headers.get("retry-after"):
        tally.add("refused (429)", 429)
        time.sleep(float(r.headers["retry-after"]))
    elif r.status_code == 503:
        tally.add("overloaded (503)", 503)
    else:
        tally.add("failed", r.status_code, f"{what}: {r.status_code} {r.text[:200]}")


def _client(base: str, seed: int, until: float, args, tally: Tally) -> None:
    rng = random.Random(seed)
    with httpx.Client(timeout=args.timeout) as http:
        while time.monotonic() < until:
            path, body = _body(rng, args.max_tokens)
            cancel = None
            if rng.random() < args.cancel:
                cancel = rng.randint(1, 8) if body["stream"] else rng.uniform(0.05, 1.0)
            _request(http, base, path, body, cancel, tally)


def _probe(base: str, tally: Tally) -> str:
    """One greedy chat answer (retried while the queue is full)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 32}
    deadline = time.monotonic() + 120
    while True:
        r = httpx.post(base + "/chat/completions", json={**body, "temperature": 0}, timeout=120)
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        tally.add("probe refused (429)", 429)
        time.sleep(float(r.headers.get("retry-after", "1")))
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def _metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--cancel", type=float, default=0.25, help="share of requests the client leaves early")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds without an answer = a lost request")
    ap.add_argument("--passes", default="quantize{source=gguf}", help="effx's pipeline")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "effx.cli", "serve", "--model", MODEL, "--port", str(port)]
    argv += ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
    argv += ["--passes", args.passes] if args.passes else []
    print(
        f"soak: effx serve {MODEL} ({args.passes or 'dense'}, max batch {args.max_batch}, queue "
        f"{args.max_queue}), {args.clients} clients, {args.minutes:g} min, {args.cancel:.0%} left early; "
        f"{describe()}",
        flush=True,
    )
    tally = Tally()
    with running_server(argv, port, "/health", {}) as base:
        root = base.removesuffix("/v1")
        first = _probe(base, tally)
        probes = [first]
        start = time.monotonic()
        until = start + args.minutes * 60
        clients = [
            threading.Thread(
                target=_client, args=(base, args.seed * 1000 + i, until, args, tally), daemon=True
            )
            for i in range(args.clients)
        ]
        for t in clients:
            t.start()
        while any(t.is_alive() for t in clients):
            time.sleep(min(60.0, max(0.0, until - time.monotonic())) or 1.0)
            if time.monotonic() < until:
                probes.append(_probe(base, tally))
                with tally.lock:
                    seen = dict(tally.outcomes)
                print(f"  {(time.monotonic() - start) / 60:4.1f} min: {seen}", flush=True)
        for t in clients:
            t.join()
        time.sleep(1.0)  # the last cancelled rows leave at the next step
        probes.append(_probe(base, tally))
        health = httpx.get(root + "/health", timeout=10)
        metrics = httpx.get(root + "/metrics", timeout=10).text
    checks = {
        "no failed or lost request": not tally.failures,
        "the probe's text never changed": all(p == first for p in probes),
        "/health answers 200 after the soak": health.status_code == 200,
        "queue and batch are empty after the soak": _metric(metrics, "effx_queue_length") == 0
        and _metric(metrics, "effx_batch_size") == 0,
        "/metrics counts the 429s the clients saw": _metric(metrics, "effx_requests_rejected_total")
        == tally.statuses[429],
        "/metrics counts no 5xx": all(
            _metric(metrics, "effx_requests_total", f'status="{s}"') == 0 for s in range(500, 600) if s != 503
        ),
    }
    total = sum(tally.outcomes.values())
    print(f"{total} requests: {dict(tally.outcomes)}; {len(probes)} probes")
    print(
        f"served: {_metric(metrics, 'effx_completion_tokens_total'):.0f} tokens, "
        f"{_metric(metrics, 'effx_requests_cancelled_total'):.0f} cancellations seen by the server"
    )
    for failure in tally.failures[:20]:
        print(f"  FAILED {failure}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
