"""Secrets: Redis and its signed entries, key files, config files, redaction."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import redis

from casperd.cache import ResultCache, signing_key
from casperd.childserver import free_port
from casperd.ctl.main import main as caspectl
from casperd.embedded_redis import EmbeddedRedis
from casperd.logsetup import redact


def test_embedded_redis_wants_its_password(embedded_redis: EmbeddedRedis) -> None:
    """Issue #9: as uid nobody, writing into the unauthenticated Redis poisoned a cached result."""
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(embedded_redis.url).set("casper:result:x", b"POISONED")
    assert stat.S_IMODE(embedded_redis.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((embedded_redis.data_dir / "redis.conf").stat().st_mode) == 0o600
    cmdline = Path(f"/proc/{embedded_redis.proc.pid}/cmdline").read_bytes() if embedded_redis.proc else b""
    assert embedded_redis.password.encode() not in cmdline


async def test_cache_entries_forged_without_the_mesh_key_are_ignored(embedded_redis: EmbeddedRedis) -> None:
    password = embedded_redis.password
    mesh = ResultCache(embedded_redis.url, password=password, sign_key=signing_key("mesh-key-1", password))
    raw = redis.Redis.from_url(embedded_redis.url, password=password)  # someone who got the password only
    try:
        calls = 0

        async def compute() -> str:
            nonlocal calls
            calls += 1
            return "honest"

        import msgpack

        raw.set("casper:result:k1", b"\x00" * 32 + msgpack.packb("POISONED"))  # a forged signature
        raw.set("casper:result:k2", msgpack.packb("POISONED"))  # no signature at all
        assert await mesh.get_or_compute("k1", compute) == "honest"
        assert await mesh.get_or_compute("k2", compute) == "honest"
        assert calls == 2 and mesh.forged == 2
        # what the mesh wrote itself is read back; an entry signed with another key is not
        assert await mesh.get_or_compute("k1", compute) == "honest" and calls == 2
        other = ResultCache(embedded_redis.url, password=password, sign_key=signing_key("another-key", password))
        assert await other.get_or_compute("k1", compute) == "honest" and calls == 3 and other.forged == 1
        await other.close()
    finally:
        raw.close()
        await mesh.close()


def test_keygen_refuses_to_overwrite_a_key(tmp_path: Path, capsys: Any) -> None:
    """Issue #9: caspectl keygen silently overwrote an existing secret key."""
    assert caspectl(["keygen", str(tmp_path), "node"]) == 0
    secret = (tmp_path / "node.key").read_text()
    assert stat.S_IMODE((tmp_path / "node.key").stat().st_mode) == 0o600
    assert caspectl(["keygen", str(tmp_path), "node"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "node.key").read_text() == secret
    assert caspectl(["keygen", str(tmp_path), "node", "--force"]) == 0
    assert (tmp_path / "node.key").read_text() != secret


@pytest.mark.parametrize(
    "line",
    [
        "postgresql://casper:Sup3rS3cret@db:5432/casper",
        "postgresql://db:5432/casper?user=casper&password=Sup3rS3cret&sslmode=require",
        "host=db port=5432 password=Sup3rS3cret user=casper",
        "{'password': 'Sup3rS3cret'}",
        '{"password": "Sup3rS3cret"}',
        "PGPASSWORD=Sup3rS3cret psql",
        "redis://:Sup3rS3cret@cache:6379/0",
    ],
)
def test_redaction_covers_url_and_key_value_password_forms(line: str) -> None:
    """Issue #9: log redaction missed ?password= in URLs and password= key-value forms."""
    assert "Sup3rS3cret" not in redact(line)


def test_casperd_up_files_never_expose_a_database_password(tmp_path: Path) -> None:
    """Issue #9: `casperd up --database-url postgresql://casper:PW@...` wrote the password into a
    0644 file. The node's config (which must carry the URL) is 0600; mesh.json names it without."""
    from casperd.localmesh import LocalMesh

    url = "postgresql://casper:Sup3rS3cret@db:5432/casper"
    mesh = LocalMesh(tmp_path / "m", database_url=url, redis_url=None, port_base=free_port())
    node = mesh.add_node("policeman", "policeman", mesh.port_base, start=False)
    config = mesh.write_config(node)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    described = mesh.write_description()
    assert "Sup3rS3cret" not in described.read_text() and stat.S_IMODE(described.stat().st_mode) == 0o600
