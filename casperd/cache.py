"""The shared result cache (Redis, ``redis.asyncio``): results only, never task state.

``get_or_compute(key, compute)`` returns the cached value for ``key`` or computes it once for the
whole mesh: the first node to take the key's lock (``SET NX PX``) computes and stores the value
with a TTL; the others poll for it (backing off from 5 ms to 100 ms) until it appears or the lock
lapses, then compute themselves. Inside one process concurrent callers share one future.

Every entry is signed: ``HMAC-SHA256(mesh key, key || value)`` prefixed to the value. An entry
whose signature does not match (written by anyone without the mesh key, e.g. a local user who
reached Redis) is ignored as a miss and counted in ``forged``. Redis itself wants a password
(``requirepass``) from a secret.

Redis unreachable: the cache is bypassed (counted in ``bypassed``), the value is computed
locally, and a circuit breaker stops further Redis calls for a while so a dead Redis costs no
latency. The task never fails because of the cache.

redis-py (~9 MB RSS) is imported on the first cache operation, in a thread: a node that never
touches the cache does not load it. The health check's ping speaks RESP over a plain connection
of its own until then, so a health probe does not load it either.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import msgpack

from casperd.breaker import CircuitBreaker

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from casperd.settings import Settings

log = logging.getLogger("casperd.cache")
_PREFIX = "casper:result:"
_LOCK = "casper:lock:"


def cache_key(*parts: Any) -> str:
    """A key from everything that determines a result (canonical JSON, SHA-256)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


_MAC = 32


def signing_key(cache_key: str | None, password: str | None) -> bytes | None:
    """The key that signs entries: the mesh cache key, else one derived from the Redis password
    (then whoever holds the password may write entries), else None (no cache: unsigned entries
    would be trusted from anyone who reaches Redis)."""
    if cache_key:
        return hashlib.sha256(b"casper-cache-key\0" + cache_key.encode()).digest()
    if password:
        return hashlib.sha256(b"casper-cache-password\0" + password.encode()).digest()
    return None


class ResultCache:
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 3600.0,
        lock_s: float = 60.0,
        op_timeout_s: float = 0.5,
        password: str | None = None,
        sign_key: bytes | None = None,
    ) -> None:
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ms = int(lock_s * 1000)
        self.sign_key = sign_key if sign_key is not None else signing_key(None, password)
        if url and self.sign_key is None:
            log.warning("result cache off: entries must be signed; set --cache-key-file or --redis-password-file")
        self._url = url if url and self.sign_key is not None else ""
        self._password = password or None
        self._op_timeout_s = op_timeout_s
        self._redis: aioredis.Redis | None = None
        self._errors: tuple[type[BaseException], ...] = (OSError,)
        """What a failed Redis call raises (redis-py's errors join once it is loaded)."""
        self.forged = 0
        self.breaker = CircuitBreaker(failure_threshold=2, recovery_s=5.0)
        self._local: dict[str, asyncio.Future[Any]] = {}
        self.hits = self.misses = self.bypassed = self.computed = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultCache:
        from casperd.transport import read_secret_file

        password = read_secret_file(settings.redis_password_file, "Redis password")
        mesh_key = read_secret_file(settings.cache_key_file, "cache signing key")
        return cls(
            settings.redis_url,
            ttl_s=settings.cache_ttl_s,
            password=password,
            sign_key=signing_key(mesh_key, password),
        )

    @property
    def enabled(self) -> bool:
        return bool(self._url)

    def _connect(self, mod: Any) -> aioredis.Redis:
        if self._redis is None:
            self._redis = mod.from_url(
                self._url,
                socket_timeout=self._op_timeout_s,
                socket_connect_timeout=self._op_timeout_s,
                retry_on_timeout=False,
                password=self._password,
            )
            self._errors = (mod.RedisError, OSError)
        return self._redis

    async def _conn(self) -> aioredis.Redis:
        """The client, created on first use (redis-py imported in a thread; the loop keeps serving)."""
        if self._redis is not None:
            return self._redis
        return self._connect(await asyncio.to_thread(importlib.import_module, "redis.asyncio"))

    @property
    def redis(self) -> aioredis.Redis | None:
        """The client (None: the cache is off); creating it here imports redis-py on the caller's thread."""
        if not self.enabled:
            return None
        return self._connect(importlib.import_module("redis.asyncio"))

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def get_or_compute(self, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        fut = self._local.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._local[key] = fut
        try:
            value = await self._resolve(key, compute)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        else:
            fut.set_result(value)
            return value
        finally:
            self._local.pop(key, None)

    async def _resolve(self, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        """Redis errors never make a task fail or run twice: the handler runs at most once here,
        outside every Redis call, and a Redis failure after it ran keeps its value."""
        if not self.enabled or not self.breaker.allow(time.monotonic()):
            self.bypassed += 1
            return await self._compute(compute)
        try:
            r = await self._conn()
            found, value = await self._get(key)
            if found:
                self.hits += 1
                self.breaker.record_success()
                return value
            owner = await r.set(_LOCK + key, secrets.token_hex(8), nx=True, px=self.lock_ms)
        except self._errors as exc:
            return await self._bypass(exc, compute)
        if owner:
            self.misses += 1
            try:
                value = await self._compute(compute)
            except BaseException:
                await self._quietly(r.delete(_LOCK + key))  # let a waiter compute instead
                raise
            if await self._quietly(
                r.set(_PREFIX + key, self._seal(key, msgpack.packb(value, use_bin_type=True)), px=self.ttl_ms)
            ):
                await self._quietly(r.delete(_LOCK + key))
                self.breaker.record_success()
            return value
        # another node computes it: wait for its value while its lock lives
        delay = 0.005
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
            try:
                found, value = await self._get(key)
                lock_alive = found or bool(await r.exists(_LOCK + key))
            except self._errors as exc:
                return await self._bypass(exc, compute)
            if found:
                self.hits += 1
                self.breaker.record_success()
                return value
            if not lock_alive:
                self.misses += 1
                return await self._compute(compute)

    async def _bypass(self, exc: BaseException, compute: Callable[[], Awaitable[Any]]) -> Any:
        self._redis_failed(exc)
        self.bypassed += 1
        return await self._compute(compute)

    def _redis_failed(self, exc: BaseException) -> None:
        self.breaker.record_failure(time.monotonic())
        log.warning("cache: Redis unavailable (%s); running without the cache", type(exc).__name__)

    async def _quietly(self, call: Awaitable[Any]) -> bool:
        """A Redis call whose failure is only counted (the result at hand stays valid)."""
        try:
            await call
            return True
        except self._errors as exc:
            self._redis_failed(exc)
            return False

    async def _get(self, key: str) -> tuple[bool, Any]:
        raw = await (await self._conn()).get(_PREFIX + key)
        if raw is None:
            return False, None
        payload = self._open(key, raw if isinstance(raw, bytes) else raw.encode())
        if payload is None:
            return False, None
        return True, msgpack.unpackb(payload, raw=False)

    def _mac(self, key: str, payload: bytes) -> bytes:
        assert self.sign_key is not None
        return hmac.new(self.sign_key, key.encode() + b"\0" + payload, hashlib.sha256).digest()

    def _seal(self, key: str, payload: bytes) -> bytes:
        return self._mac(key, payload) + payload

    def _open(self, key: str, raw: bytes) -> bytes | None:
        """The payload of a signed entry; None (ignored, counted) if not signed with our key."""
        payload = raw[_MAC:]
        if len(raw) >= _MAC and hmac.compare_digest(raw[:_MAC], self._mac(key, payload)):
            return payload
        self.forged += 1
        if self.forged == 1 or self.forged % 1000 == 0:
            log.warning("cache: ignored %d entries not signed with the mesh key (written by someone else)", self.forged)
        return None

    async def _compute(self, compute: Callable[[], Awaitable[Any]]) -> Any:
        self.computed += 1
        return await compute()

    async def ping(self) -> bool:
        if not self.enabled:
            return False
        if self._redis is None:  # not loaded yet: a health probe does not load redis-py
            return await resp_ping(self._url, self._password, self._op_timeout_s)
        try:
            return bool(await self._redis.ping())
        except self._errors:
            return False

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "hits": self.hits,
            "misses": self.misses,
            "bypassed": self.bypassed,
            "computed": self.computed,
            "forged": self.forged,
            "breaker": self.breaker.state.value,
        }


def _resp(*words: str) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for w in words:
        b = w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


async def resp_ping(url: str, password: str | None, timeout_s: float) -> bool:
    """PING over a connection of its own (``redis://``, ``rediss://`` or ``unix://`` URLs), with
    ``AUTH`` first when there is a password (the argument, else the URL's): True on ``+PONG``."""
    u = urlsplit(url)
    user = unquote(u.username) if u.username else None
    secret = password or (unquote(u.password) if u.password else None)
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            if u.scheme == "unix":
                reader, writer = await asyncio.open_unix_connection(u.path)
            else:
                tls = ssl.create_default_context() if u.scheme == "rediss" else None
                reader, writer = await asyncio.open_connection(u.hostname or "localhost", u.port or 6379, ssl=tls)
            if secret:
                writer.write(_resp("AUTH", *((user,) if user else ()), secret))
                if not (await reader.readline()).startswith(b"+OK"):
                    return False
            writer.write(_resp("PING"))
            return (await reader.readline()).startswith(b"+PONG")
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
