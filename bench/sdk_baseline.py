"""The direct call: what one model call costs any client of the model, with no mesh around it.

``bench.swarm_speedup`` measures a developer node's ``ask`` as wall time beyond the fake model's
latency; part of that is not the mesh's but the ``anthropic`` SDK's (building the request, HTTP,
parsing the streamed reply into the final message) and the scripted server's own serving time.
This module makes the same call as the developer's ``ask`` handler, straight from a fresh process:

* the real ``anthropic.AsyncAnthropic``, built once and reused, as ``ClaudeClient._sdk`` builds it
  (the same base URL and dummy key, ``max_retries=0``, the idle timeout of ``llm_timeout_s``);
* the request ``run_ask`` sends through ``ClaudeClient.create`` (``casperd.agents.apicall``):
  the developer's model, no system prompt, one user message whose last block carries the
  prompt-cache breakpoint, the task's ``max_tokens``, streamed (``messages.stream``, then
  ``get_final_message``, as ``apicall.stream_once``);
* on the event loop a node runs (``event_loop`` setting) with the node's collector tuning;
* sequentially, after uncounted warm-up calls (the first connection, the SDK's lazy imports).

``swarm_speedup`` checks that the server received requests of the same shape from both sides
(:func:`request_shape`), so a change to the developer's request that this module does not follow
fails the benchmark instead of skewing it.

Run in its own process (:func:`measure` starts ``python -m bench.sdk_baseline``): the fake
server's threads live in the benchmark's process, and a client there would share their GIL,
which no developer node does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

API_KEY = "sk-bench-not-a-real-key"


def prompt(tag: str, i: int) -> str:
    """The ``i``-th prompt of a batch (the same text and size on every side of the benchmark, but
    the 8-hex nonce and the tag, which the callers keep at the same length)."""
    import uuid

    return f"[{tag} #{i}] Name one prime number greater than {1000 + i}. ({uuid.uuid4().hex[:8]})"


def request_shape(body: dict[str, Any], headers: dict[str, str]) -> str:
    """A request as the server saw it, but for the prompt's text (its length kept) and the header
    values (their names kept): equal for equal calls from the mesh and from here."""

    def walk(x: Any, key: str = "") -> Any:
        if isinstance(x, dict):
            return {k: walk(v, k) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return len(x) if key == "text" and isinstance(x, str) else x

    volatile = {"content-length", "x-stainless-read-timeout"}
    names = sorted(k for k in headers if k not in volatile)
    return json.dumps({"body": walk(body), "headers": names}, sort_keys=True)


@dataclass
class Direct:
    """Sequential direct calls: per call, the prompt and its send and final-message times
    (``time.monotonic``, one clock for every process on this machine)."""

    latency_s: float
    calls: list[tuple[str, float, float]] = field(default_factory=list)
    warmup: int = 0
    event_loop: str = ""
    cpu_ms_per_call: float = 0.0
    """The client process's CPU (every thread) over the measured calls, per call."""
    steps_s: dict[str, float] = field(default_factory=dict)
    """Median seconds of the call's two halves, from the server's arrivals (filled by the caller)."""
    shapes: list[str] = field(default_factory=list)
    """The calls as the server saw them (:func:`request_shape`; filled by the caller)."""

    def beyond_ms(self) -> list[float]:
        """Each call's wall time beyond the model's latency, ms."""
        return [1000 * (t1 - t0 - self.latency_s) for _, t0, t1 in self.calls]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.beyond_ms())

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.beyond_ms())


async def _calls(
    url: str, tag: str, n: int, warmup: int, max_tokens: int, model: str, timeout_s: float
) -> tuple[list[tuple[str, float, float]], float]:
    from casperd.eventloop import tune_gc

    tune_gc()  # as a node does once it has started, before its first model call loads the SDK
    import anthropic

    from casperd.agents import apicall

    sdk = anthropic.AsyncAnthropic(
        api_key=API_KEY, base_url=url, timeout=apicall.idle_timeout(timeout_s), max_retries=0
    )
    out: list[tuple[str, float, float]] = []
    cpu0 = 0.0
    try:
        for i in range(-warmup, n):
            if i == 0:
                cpu0 = time.process_time()
            text = prompt(tag, i) if i >= 0 else prompt(f"{tag[:-1]}w", warmup + i)
            t0 = time.monotonic()
            async with sdk.messages.stream(
                model=model,
                max_tokens=max_tokens,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}],
                    }
                ],
            ) as stream:
                _ = stream.response.headers
                message = await stream.get_final_message()
            t1 = time.monotonic()
            if not message.content:
                raise RuntimeError("the server answered an empty message")
            if i >= 0:
                out.append((text, t0, t1))
        cpu_ms = 1000 * (time.process_time() - cpu0) / max(1, n)
    finally:
        await sdk.close()
    return out, cpu_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the fake server's base URL")
    ap.add_argument("--tag", required=True, help="the prompts' tag (keep its length equal to the mesh's)")
    ap.add_argument("--calls", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, required=True)
    a = ap.parse_args()
    from casperd.eventloop import loop_factory
    from casperd.settings import load_settings

    s = load_settings()  # the developer's model, idle timeout and event loop, as a node resolves them
    model = s.models.get("developer") or "claude-sonnet-4-6"
    with asyncio.Runner(loop_factory=loop_factory(s.event_loop)) as runner:
        calls, cpu_ms = runner.run(_calls(a.url, a.tag, a.calls, a.warmup, a.max_tokens, model, s.llm_timeout_s))
    print(json.dumps({"calls": calls, "event_loop": s.event_loop, "cpu_ms_per_call": cpu_ms}))
    return 0


def measure(url: str, latency_s: float, tag: str, n: int, warmup: int, max_tokens: int) -> Direct:
    """``n`` sequential direct calls (after ``warmup``) from a fresh ``python -m bench.sdk_baseline``
    with a node's environment (no ``CASPER_*`` but the dummy key)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CASPER_", "ANTHROPIC_"))}
    env["ANTHROPIC_API_KEY"] = API_KEY
    cmd = [sys.executable, "-m", "bench.sdk_baseline", "--url", url, "--tag", tag, "--calls", str(n)]
    cmd += ["--warmup", str(warmup), "--max-tokens", str(max_tokens)]
    root = Path(__file__).resolve().parent.parent
    timeout = 120 + (n + warmup) * (latency_s + 5)
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the direct SDK calls failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    calls = [(str(p), float(t0), float(t1)) for p, t0, t1 in got["calls"]]
    return Direct(
        latency_s=latency_s,
        calls=calls,
        warmup=warmup,
        event_loop=str(got["event_loop"]),
        cpu_ms_per_call=float(got["cpu_ms_per_call"]),
    )


if __name__ == "__main__":
    sys.exit(main())
