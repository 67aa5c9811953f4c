"""The typed plugin interface: a node's Catalog of task types, validators and mesh services."""

from __future__ import annotations

from typing import Any

import pytest

from casperd import handlers
from casperd.agents import tasktypes
from casperd.errors import UnknownTaskTypeError
from casperd.handlers import Catalog, TaskType


async def _run(ctx: Any, data: dict[str, Any]) -> Any:
    return data


def test_the_builtins_are_in_every_catalog_and_plugins_only_where_installed() -> None:
    bare = Catalog()
    assert {"noop", "echo", "sleep", "shell"} <= set(bare.type_names)
    assert bare.find("code") is None, "handlers knows no plugin by itself"
    assert "code" not in handlers.REGISTRY
    node = tasktypes.install(Catalog())
    assert {"ask", "code", "test", "job"} <= set(node.type_names)
    assert node.get("job").local and node.get("test").input_attachments
    assert node.get("code").requires == ("code",)


def test_catalogs_are_independent() -> None:
    a, b = Catalog(), Catalog()
    a.add_type(TaskType("custom", _run))
    assert a.find("custom") is not None and b.find("custom") is None


def test_validators_need_a_known_type_and_services_carry_their_roles() -> None:
    c = Catalog()

    async def check(*_a: Any) -> str | None:
        return None

    with pytest.raises(UnknownTaskTypeError):
        c.add_validator("no-such-type", check)
    c.add_validator("echo", check)
    assert c.validator("echo") is check and c.validator("noop") is None

    async def svc(node: str, args: dict[str, Any], att: tuple[bytes, ...]) -> tuple[Any, tuple[bytes, ...]]:
        return {}, ()

    c.add_service("ping", svc, roles=frozenset({"developer"}))
    s = c.service("ping")
    assert s is not None and s.run is svc and s.roles == frozenset({"developer"})
    assert c.service_names == ["ping"] and c.service("pong") is None


def test_validation_is_asked_for_by_the_type_not_by_a_hard_coded_field() -> None:
    def ok(data: dict[str, Any], out: Any) -> str | None:
        return None

    always = TaskType("always", _run, validate=ok)
    on_flag = TaskType("flagged", _run, validate=ok, validate_when=lambda d: bool(d.get("check")))
    assert always.needs_validation({}) and always.needs_validation({"expect_exit": 0})
    assert on_flag.needs_validation({"check": True}) and not on_flag.needs_validation({"expect_exit": 0})
    assert not TaskType("plain", _run).needs_validation({"expect_exit": 0})
