"""Soak: a steady mixed load on one server for a long time, then an account of what went right and wrong.

`--clients` async clients each send, one after another until `--minutes` pass (or `--max-requests` are sent):
chats and completions, streamed and not, with fresh prompts (a counter and random words: never a prefix-cache
replay); some streams are dropped by the client after a few chunks (a disconnect), a few requests are bad on
purpose (a lone surrogate, NaN, a negative max_tokens, a wrong type) and must get a shaped 400. A prober asks
/health every 100 ms. At the end, with the load gone: KV blocks in use must be 0, nothing running or waiting.

Reports requests served by kind, errors by kind, disconnects, KV blocks at the end, server RSS after warm-up and
at the end, /health p50/p99/max, output tokens/s, and the CPU's ISA flags. Exits 1 on any unexpected error, a
failed probe, blocks left in use, or RSS growth over `--max-rss-growth`.

    .venv/bin/python benchmarks/soak.py --minutes 20                # starts `pagoda serve` on the default model
    .venv/bin/python benchmarks/soak.py --minutes 1 --clients 2     # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pagoda.kernels import host_isa
from tests.servers import ServerProcess, metric

WORDS = ("river mountain lantern copper violet harbor meadow engine orbit thunder pepper marble falcon canyon "
         "velvet signal glacier compass ember willow quartz rocket saffron tunnel").split()
MODEL = "soak"
BAD_BODIES = [  # (route, raw JSON body): each must get a 400 in OpenAI's error shape
    ("/v1/completions", b'{"model": "soak", "prompt": "\\ud800 hello", "max_tokens": 4}'),
    ("/v1/chat/completions", b'{"model": "soak", "messages": [{"role": "user", "content": "hi"}], '
                             b'"temperature": NaN}'),
    ("/v1/completions", b'{"model": "soak", "prompt": "hello", "max_tokens": -3}'),
    ("/v1/chat/completions", b'{"model": "soak", "messages": "not a list"}'),
    ("/v1/completions", b'{"model": "soak", "prompt": "hello", "top_p": "high"}'),
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Tally:
    def __init__(self):
        self.served = collections.Counter()  # kind -> requests that completed correctly
        self.errors = collections.Counter()  # "kind: what" -> count (unexpected)
        self.bad_refused = 0  # bad requests answered with a shaped 400 (expected)
        self.disconnects = 0
        self.output_tokens = 0
        self.sent = 0


def fresh_prompt(rng: random.Random, serial: int) -> str:
    return f"#{serial}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 60)))


async def one_request(client: httpx.AsyncClient, rng: random.Random, serial: int, tally: Tally,
                      p_bad: float, p_disconnect: float) -> None:
    if rng.random() < p_bad:
        route, raw = rng.choice(BAD_BODIES)
        response = await client.post(route, content=raw, headers={"Content-Type": "application/json"})
        error = response.json().get("error") if response.headers.get("content-type", "").startswith(
            "application/json") else None
        if response.status_code == 400 and error and error.get("message"):
            tally.bad_refused += 1
        else:
            tally.errors[f"bad request got {response.status_code}"] += 1
        return
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    kind = ("chat" if chat else "completion") + ("+stream" if stream else "")
    prompt = fresh_prompt(rng, serial)
    body: dict = {"model": MODEL, "max_tokens": rng.randint(8, 64), "temperature": rng.choice([0, 0.7]),
                  "seed": serial}
    if chat:
        route = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Write about these words. {prompt}"}]
    else:
        route = "/v1/completions"
        body["prompt"] = prompt
    if not stream:
        response = await client.post(route, json=body)
        if response.status_code != 200:
            tally.errors[f"{kind}: HTTP {response.status_code}"] += 1
            return
        answer = response.json()
        choice = answer["choices"][0]
        if choice["finish_reason"] not in ("stop", "length"):
            tally.errors[f"{kind}: finish_reason {choice['finish_reason']}"] += 1
            return
        tally.output_tokens += answer["usage"]["completion_tokens"]
        tally.served[kind] += 1
        return
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    drop_after = rng.randint(1, 6) if rng.random() < p_disconnect else None
    chunks, done, usage, finish = 0, False, None, None
    async with client.stream("POST", route, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            tally.errors[f"{kind}: HTTP {response.status_code}"] += 1
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line[6:] == "[DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                tally.errors[f"{kind}: in-band error {event['error'].get('code')}"] += 1
                return
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                finish = choice.get("finish_reason") or finish
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                tally.disconnects += 1
                return  # leaving the block closes the connection mid-stream
    if not done or finish not in ("stop", "length") or usage is None:
        tally.errors[f"{kind}: ended without [DONE]/finish/usage"] += 1
        return
    tally.output_tokens += usage["completion_tokens"]
    tally.served[kind] += 1


async def client_loop(url: str, seed: int, deadline: float, budget: list[int], tally: Tally, p_bad: float,
                      p_disconnect: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            tally.sent += 1
            serial = tally.sent
            try:
                await one_request(client, rng, serial, tally, p_bad, p_disconnect)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                tally.errors[f"client exception {type(exc).__name__}"] += 1


async def prober(url: str, stop: asyncio.Event, latencies: list[float], failures: collections.Counter) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                response = await client.get("/health")
                if response.status_code != 200:
                    failures[f"/health {response.status_code}"] += 1
            except httpx.HTTPError as exc:
                failures[f"/health {type(exc).__name__}"] += 1
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.1)


async def soak(url: str, minutes: float, clients: int, max_requests: int, p_bad: float, p_disconnect: float,
               pid: int | None, seed: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120) as warm:  # warm-up, then the RSS baseline
        for i in range(4):
            await warm.post("/v1/completions", json={"model": MODEL, "prompt": f"warm-up {i} {seed}",
                                                     "max_tokens": 16})
    rss_start = rss_bytes(pid) if pid else None
    tally, latencies, probe_failures, stop = Tally(), [], collections.Counter(), asyncio.Event()
    probe = asyncio.create_task(prober(url, stop, latencies, probe_failures))
    start = time.monotonic()
    budget = [max_requests]
    await asyncio.gather(*(client_loop(url, seed * 1000 + i, start + 60 * minutes, budget, tally, p_bad,
                                       p_disconnect) for i in range(clients)))
    elapsed = time.monotonic() - start
    stop.set()
    await probe
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:  # the load is gone: everything must drain
        idle_deadline = time.monotonic() + 30
        while True:
            text = (await c.get("/metrics")).text
            busy = (metric(text, "vllm:num_requests_running") + metric(text, "vllm:num_requests_waiting")
                    + metric(text, "pagoda:kv_cache_blocks_used"))
            if busy == 0 or time.monotonic() > idle_deadline:
                break
            await asyncio.sleep(0.2)
    rss_end = rss_bytes(pid) if pid else None
    return {
        "cpu_isa": host_isa(), "minutes": round(elapsed / 60, 2), "clients": clients,
        "requests_sent": tally.sent, "served": dict(sorted(tally.served.items())),
        "served_total": sum(tally.served.values()), "client_disconnects": tally.disconnects,
        "bad_requests_refused_400": tally.bad_refused, "unexpected_errors": dict(tally.errors),
        "output_tokens": tally.output_tokens, "output_tok_per_s": round(tally.output_tokens / elapsed, 1),
        "kv_blocks_used_end": metric(text, "pagoda:kv_cache_blocks_used"),
        "running_end": metric(text, "vllm:num_requests_running"),
        "waiting_end": metric(text, "vllm:num_requests_waiting"),
        "rss_start_mib": round(rss_start / 2**20, 1) if rss_start else None,
        "rss_end_mib": round(rss_end / 2**20, 1) if rss_end else None,
        "health_probes": len(latencies), "health_failures": dict(probe_failures),
        "health_p50_ms": round(1000 * statistics.median(latencies), 1),
        "health_p99_ms": round(1000 * percentile(latencies, 99), 1),
        "health_max_ms": round(1000 * max(latencies), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server serving the name 'soak' (default: start one on --model)")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--max-requests", type=int, default=100_000, help="a bound on the count as well")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--bad-fraction", type=float, default=0.03)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1, help="of the streamed requests")
    parser.add_argument("--max-rss-growth", type=float, default=0.25, help="fail above this fraction")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--out", help="also write the JSON result here")
    args = parser.parse_args()
    server, url, pid = None, args.url, args.pid
    if url is None:  # loopback only; the server's log goes to a temporary file
        server = ServerProcess(args.model, "--served-model-name", MODEL, log_dir=Path(tempfile.mkdtemp())).start(180)
        url, pid = server.url, server.process.pid
    try:
        result = asyncio.run(soak(url, args.minutes, args.clients, args.max_requests, args.bad_fraction,
                                  args.disconnect_fraction, pid, args.seed))
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    failed = [reason for reason, bad in [
        ("unexpected errors", bool(result["unexpected_errors"])),
        ("/health failures", bool(result["health_failures"])),
        ("KV blocks left in use", result["kv_blocks_used_end"] != 0),
        ("requests left running or waiting", result["running_end"] + result["waiting_end"] != 0),
        ("RSS grew", bool(result["rss_start_mib"]) and
         result["rss_end_mib"] > result["rss_start_mib"] * (1 + args.max_rss_growth)),
    ] if bad]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
