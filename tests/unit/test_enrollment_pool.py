"""Pattern enrollment (a pool of replicas sharing one key) against fixed node ids: a node id some
entry names exactly is reserved to that entry's key, so no pattern key may claim it."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from casperd import authz, handoff
from casperd.enrollment import Enrollment, parse
from casperd.errors import IdentityError
from casperd.messages import Ready, Request, Role
from casperd.metrics import Metrics


def key() -> str:
    return zmq.curve_keypair()[0].decode()


def ready(node_id: str, role: str = "developer") -> Ready:
    return Ready(node_id=node_id, epoch="e1", role=Role(role), endpoint="tcp://x:1", pid=1, host="h", capacity=1)


@pytest.fixture
def book(tmp_path: Path) -> tuple[Enrollment, dict[str, str]]:
    """make-secrets.sh's enrollment, plus a legacy broad pattern ('developer-*', an older swarm key)."""
    keys = {name: key() for name in ("policeman", "developer-1", "developer-2", "pool", "legacy")}
    path = tmp_path / "authorized_keys"
    path.write_text(
        f"{keys['policeman']} policeman policeman\n"
        f"{keys['developer-1']} developer-1 developer\n"
        f"{keys['developer-2']} developer-2 developer\n"
        f"{keys['pool']} developer-pool-* developer\n"
        f"{keys['legacy']} developer-* developer\n"
    )
    return Enrollment(path), keys


def test_the_pool_key_claims_pool_ids_only(book: tuple[Enrollment, dict[str, str]]) -> None:
    b, k = book
    for node_id in ("developer-pool-1", "developer-pool-ab3", "developer-pool-17"):
        assert b.admits(k["pool"], node_id, "developer"), node_id
    for node_id in ("developer-1", "developer-2", "developer-7", "developer-pool", "policeman", "tester"):
        assert not b.admits(k["pool"], node_id, "developer"), node_id
    assert not b.admits(k["pool"], "developer-pool-1", "tester")  # the role is the key's


def test_a_pattern_never_claims_an_id_enrolled_exactly(book: tuple[Enrollment, dict[str, str]]) -> None:
    b, k = book
    assert b.reserved == {"policeman", "developer-1", "developer-2"}
    # 'developer-*' matches developer-1 as a pattern, but developer-1 is developer-1's key's
    assert not b.admits(k["legacy"], "developer-1", "developer")
    assert not b.admits(k["legacy"], "developer-2", "developer")
    assert b.admits(k["legacy"], "developer-7", "developer")
    assert b.admits(k["legacy"], "developer-pool-1", "developer")  # not reserved: ids no entry names
    # the fixed keys keep their own ids, and only those
    assert b.admits(k["developer-1"], "developer-1", "developer")
    assert not b.admits(k["developer-1"], "developer-2", "developer")
    entry = b.lookup(k["legacy"])
    with pytest.raises(IdentityError, match="enrolled for another key"):
        authz.bind(ready("developer-1"), entry=entry, key=k["legacy"], peer_key=None, reserved=b.reserved)
    authz.bind(ready("developer-7"), entry=entry, key=k["legacy"], peer_key=None, reserved=b.reserved)
    # without the reservation list (the old rule) the pattern alone would have admitted it
    assert entry is not None and entry.admits("developer-1", "developer")


def test_reservations_follow_the_file(book: tuple[Enrollment, dict[str, str]]) -> None:
    b, k = book
    assert [e.key for e in b.revoke("developer-1")] == [k["developer-1"]]
    assert "developer-1" not in b.reserved
    assert b.admits(k["legacy"], "developer-1", "developer")  # no one holds the id any more
    b.add(key(), "developer-1", "developer")  # a new key for developer-1: reserved again
    assert not b.admits(k["legacy"], "developer-1", "developer")
    assert b.path is not None
    b.path.write_text(b.path.read_text() + f"{key()} developer-7 developer\n")
    b.refresh(force=True)
    assert "developer-7" in b.reserved and not b.admits(k["legacy"], "developer-7", "developer")


def test_a_pattern_wildcard_of_any_kind_is_not_exact() -> None:
    entries = parse(f"{key()} developer-? developer\n{key()} developer-[12] developer\n{key()} tester tester\n")
    assert [e.exact for e in entries.values()] == [False, False, True]


def test_handoff_sender_cannot_be_a_reserved_id(book: tuple[Enrollment, dict[str, str]]) -> None:
    b, k = book
    spec = {"spec": {"type": "test", "input": {}}}
    handoff.admit(b, Metrics(), b"developer-pool-3/e1", Request(req_id=1, op="handoff", args=spec), k["pool"])
    with pytest.raises(IdentityError):
        handoff.admit(b, Metrics(), b"developer-1/e1", Request(req_id=2, op="handoff", args=spec), k["legacy"])
