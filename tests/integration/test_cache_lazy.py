"""The result cache loads redis-py on its first operation, and its health ping needs no redis-py
(issue #13: a node that never touches the cache does not carry the client's ~9 MB)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from casperd.cache import ResultCache, resp_ping, signing_key
from casperd.childserver import free_port
from casperd.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.integration


async def test_the_raw_ping_authenticates_and_tells_up_from_down(embedded_redis: EmbeddedRedis) -> None:
    url, password = embedded_redis.url, embedded_redis.password
    assert await resp_ping(url, password, 2.0) is True
    assert await resp_ping(url, "not-the-password", 2.0) is False
    assert await resp_ping(url, None, 2.0) is False  # Redis wants its password: no PONG without it
    assert await resp_ping(f"redis://127.0.0.1:{free_port()}/0", password, 2.0) is False  # nobody listens


_PROBE = """
import asyncio, sys
from casperd.cache import ResultCache, signing_key
URL, PW = sys.argv[1], sys.argv[2]

async def main():
    cache = ResultCache(URL, password=PW, sign_key=signing_key("k", PW))
    up = await cache.ping()
    print("ping", up, "redis loaded", "redis" in sys.modules)

    async def compute():
        return {"v": 1}

    print("value", await cache.get_or_compute("k1", compute), "redis loaded", "redis" in sys.modules)
    print("ping", await cache.ping(), "hits", cache.hits, "misses", cache.misses)
    await cache.close()

asyncio.run(main())
"""


def test_redis_py_loads_on_the_first_cache_operation_not_on_a_health_ping(embedded_redis: EmbeddedRedis) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, embedded_redis.url, embedded_redis.password or ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "ping True redis loaded False"
    assert lines[1] == "value {'v': 1} redis loaded True"
    assert lines[2] == "ping True hits 0 misses 1"


async def test_a_cache_without_a_signing_key_is_off_and_never_connects() -> None:
    cache = ResultCache("redis://127.0.0.1:1/0")
    assert not cache.enabled and cache.redis is None and await cache.ping() is False
    ran = []

    async def compute() -> int:
        ran.append(1)
        return 7

    assert await cache.get_or_compute("k", compute) == 7 and cache.bypassed == 1 and ran == [1]
    assert signing_key(None, None) is None
