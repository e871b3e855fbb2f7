"""Load test of ``offload-rt serve``: N streamed chat requests, C at a time; prints JSON with
latency and time-to-first-token percentiles and what came back (ok / failed / rejected).

Starts ``offload-rt serve [MODEL_DIR] --port 0`` (the console script, as a user runs it; the
demo model by default) unless ``--url`` points at a running server. Every request asks for
exactly ``--max-tokens`` greedy tokens (``ignore_eos``), so "nothing lost" is checked, not
assumed: each answer must end with ``[DONE]`` and report that many completion tokens, answers
to the same question must be identical (no text crossed between requests), and the server's
``/metrics`` must count every request. Usage:

    python benchmarks/serve_load.py [MODEL_DIR] [--requests 50] [--concurrency 8]
        [--max-tokens 32] [--max-queue 16] [--retry] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any

import httpx

MAX_RETRIES = 100
QUESTIONS = ("What does hacker mean?", "Tell me a fortune.", "What is a kludge?",
             "How do I read a file in Python?", "What is the Jargon File?",
             "Say something about cats.", "What is a daemon?", "Why is the sky blue?")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", nargs="?", default=None, help="default: the demo model")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue")
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    p.add_argument("--retry", action="store_true",
                   help="retry a 429/503 after its Retry-After seconds, as the openai client "
                        "does (default: count it as rejected)")
    return p.parse_args()


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str, str]:
    """``offload-rt serve`` on a free port; (process, base URL, model name)."""
    exe = shutil.which("offload-rt") or os.path.join(os.path.dirname(sys.executable),
                                                     "offload-rt")
    cmd = [exe, "serve", "--port", "0", "--max-queue", str(args.max_queue)]
    cmd += [args.model_dir] if args.model_dir else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()  # "offload-rt serve: http://127.0.0.1:PORT/v1 (model 'x'); ..."
    if not line.startswith("offload-rt serve: "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split()[2].removesuffix("/v1"), line.split("'")[1]


async def one_request(client: httpx.AsyncClient, model: str, question: str,
                      max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: status, latency, time to first token, text and usage."""
    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    out: dict[str, Any] = {"question": question, "text": "", "done": False, "ttft_s": None}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        out["status"] = response.status_code
        out["retry_after"] = response.headers.get("retry-after")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                out["done"] = True
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["completion_tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    out["ttft_s"] = out["ttft_s"] or time.perf_counter() - start
                    out["text"] += choice["delta"]["content"]
    out["latency_s"] = time.perf_counter() - start
    return out


async def with_retries(client: httpx.AsyncClient, model: str, question: str,
                       args: argparse.Namespace) -> dict[str, Any]:
    """``one_request``; with ``--retry``, again after Retry-After while it is refused (latency
    and time to first token then count from the first attempt)."""
    start, retries = time.perf_counter(), 0
    while True:
        out = await one_request(client, model, question, args.max_tokens)
        if not (args.retry and out["status"] in (429, 503)) or retries == MAX_RETRIES:
            break
        retries += 1
        await asyncio.sleep(float(out.get("retry_after") or 1))
    waited = time.perf_counter() - start - out["latency_s"]  # the earlier attempts
    out["latency_s"] += waited
    out["ttft_s"] = out["ttft_s"] and out["ttft_s"] + waited
    return {**out, "retries": retries}


async def run_load(url: str, model: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def gated(i: int) -> dict[str, Any]:
            async with gate:
                return await with_retries(client, model, QUESTIONS[i % len(QUESTIONS)], args)
        return await asyncio.gather(*(gated(i) for i in range(args.requests)))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        values = values * 2  # quantiles need two points; one request is every percentile
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 3), "p90": round(cuts[89], 3), "p99": round(cuts[98], 3),
            "max": round(max(values), 3)}


def summarize(results: list[dict[str, Any]], metrics: dict[str, Any], wall_s: float,
              args: argparse.Namespace) -> dict[str, Any]:
    complete = [r for r in results if r["status"] == 200 and r["done"]
                and r.get("completion_tokens") == args.max_tokens]
    answers = defaultdict(set)
    for r in complete:
        answers[r["question"]].add(r["text"])
    tokens = sum(r["completion_tokens"] for r in complete)
    return {
        "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "max_queue": args.max_queue,
        "ok": len(complete), "rejected": sum(r["status"] in (429, 503) for r in results),
        "failed": len(results) - len(complete) - sum(r["status"] in (429, 503)
                                                     for r in results),
        "retries": sum(r["retries"] for r in results),
        "same_answer_per_question": all(len(texts) == 1 for texts in answers.values()),
        "latency_s": percentiles([r["latency_s"] for r in complete]),
        "time_to_first_token_s": percentiles([r["ttft_s"] for r in complete if r["ttft_s"]]),
        "wall_s": round(wall_s, 3), "completion_tokens_per_s": round(tokens / wall_s, 2),
        "server_counts": metrics["requests"],
        "server_completion_tokens": metrics["generations"]["completion_tokens"],
        "server_hit_rate": metrics["experts"]["hit_rate"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
    }


def main() -> None:
    args = parse_args()
    proc, url, model = (None, args.url, None) if args.url else start_server(args)
    try:
        model = model or httpx.get(url + "/v1/models").json()["data"][0]["id"]
        start = time.perf_counter()
        results = asyncio.run(run_load(url, model, args))
        wall = time.perf_counter() - start
        metrics = httpx.get(url + "/metrics").json()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    print(json.dumps(summarize(results, metrics, wall, args)))


if __name__ == "__main__":
    main()
