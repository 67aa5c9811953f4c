"""The socket proxy's rules on a Swarm (``compose.swarm-spawner.yaml``): scale one service, no more.

The proxy (:mod:`casperd.spawners.proxy`) runs in swarm mode when its own container belongs to a
stack (the ``com.docker.stack.namespace`` label). It then forwards only what the ``swarm`` spawner
needs to scale the stack's developer service (``PROXY_SERVICE``, default ``<stack>_developer``):

* read-only: ``GET /_ping``, ``/version``, ``/info``; ``GET /services/ID`` of that service only;
  ``GET /tasks`` filtered to that service only; ``GET /containers/ID/json`` of its replicas only;
* ``POST /services/ID/update`` of that service, of which only the replica count is taken (at most
  ``PROXY_MAX_REPLICAS``): the proxy reads the service's current spec itself and sends it back
  with that count, so image, command, mounts, secrets, networks and every other field stay as the
  stack deployed them (what ``docker service scale`` does);
* ``POST /containers/ID/stop`` of a replica of that service (a retired replica drains and exits).

Everything else (other services, creating services, exec, images, volumes, secrets, nodes, the
swarm itself) is refused with 403, naming the rule.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

log = logging.getLogger("casperd.spawners.proxy")
Engine = Callable[..., Awaitable[tuple[int, bytes]]]
"""One request on the real Docker socket: (method, path[, body]) -> (status, body)."""

STACK_LABEL = "com.docker.stack.namespace"
SERVICE_NAME_LABEL = "com.docker.swarm.service.name"
_ID = r"[A-Za-z0-9_.-]+"
_READ_ONLY = [re.compile(p) for p in (r"^/_ping$", r"^/version$", r"^/info$")]
_SERVICE = re.compile(rf"^/services/({_ID})$")
_UPDATE = re.compile(rf"^/services/({_ID})/update$")
_INSPECT = re.compile(rf"^/containers/({_ID})/json$")
_STOP = re.compile(rf"^/containers/({_ID})/stop$")


@dataclass(frozen=True)
class SwarmPolicy:
    stack: str
    service: str
    """The one service the spawner may scale (by name)."""
    max_replicas: int


@dataclass(frozen=True)
class Need:
    """What the proxy must look up before it forwards an allowed request."""

    kind: str
    """``service``: the path's service must be the policy's; ``container``: a replica of it;
    ``tasks``: the filter's service must be it; ``scale``: ``service``, then the proxy's own update."""
    target: str
    replicas: int = 0


def check_swarm(method: str, p: str, query: str, body: bytes, policy: SwarmPolicy) -> tuple[str | None, Need | None]:
    """(refusal, lookup): a refusal message, or None and what must be verified (None: nothing)."""
    if method in ("GET", "HEAD"):
        if any(r.match(p) for r in _READ_ONLY):
            return None, None
        if m := _SERVICE.match(p):
            return None, Need("service", m.group(1))
        if m := _INSPECT.match(p):
            return None, Need("container", m.group(1))
        if p == "/tasks":
            service = _filtered_service(query)
            if service is None:
                return f"GET /tasks must be filtered to the service {policy.service}", None
            return None, Need("tasks", service)
        if p == "/services":
            return f"listing services is not allowed: set swarm_service to {policy.service}", None
        return f"GET {p} is not among the read-only calls the swarm spawner needs", None
    if method == "POST" and (m := _UPDATE.match(p)):
        replicas = _replicas(body)
        if replicas is None:
            return "a service update must give Mode.Replicated.Replicas (only the replica count may change)", None
        if not 0 <= replicas <= policy.max_replicas:
            return f"{replicas} replicas is outside 0..{policy.max_replicas} (PROXY_MAX_REPLICAS)", None
        return None, Need("scale", m.group(1), replicas)
    if method == "POST" and (m := _STOP.match(p)):
        return None, Need("container", m.group(1))
    return (
        f"{method} {p} is not allowed: on a swarm the proxy grants scaling {policy.service} and stopping its replicas",
        None,
    )


def _filtered_service(query: str) -> str | None:
    raw = parse_qs(query).get("filters", [""])[0]
    try:
        filters = json.loads(raw) if raw else {}
    except ValueError:
        return None
    value = filters.get("service") if isinstance(filters, dict) else None
    names = list(value) if isinstance(value, (list, dict)) else []
    return str(names[0]) if len(names) == 1 else None


def _replicas(body: bytes) -> int | None:
    """Mode.Replicated.Replicas, its keys in any case (as the engine, a Go JSON decoder, reads them:
    the docker SDK sends ``"replicated"``)."""
    try:
        n: object = json.loads(body or b"{}")
    except ValueError:
        return None
    for key in ("mode", "replicated", "replicas"):
        if not isinstance(n, dict):
            return None
        n = next((v for k, v in n.items() if str(k).lower() == key), None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def is_service(inspected: dict[str, object], policy: SwarmPolicy) -> bool:
    """Whether a ``GET /services/X`` answer is the policy's service."""
    spec = inspected.get("Spec")
    return isinstance(spec, dict) and spec.get("Name") == policy.service


def is_replica(inspected: dict[str, object], policy: SwarmPolicy) -> bool:
    """Whether a ``GET /containers/X/json`` answer is a replica of the policy's service."""
    config = inspected.get("Config")
    labels = (config.get("Labels") if isinstance(config, dict) else None) or {}
    return isinstance(labels, dict) and labels.get(SERVICE_NAME_LABEL) == policy.service


def scaled_spec(inspected: dict[str, object], replicas: int) -> tuple[bytes, int]:
    """The service's current spec with only the replica count changed, and the version to update."""
    spec = json.loads(json.dumps(inspected["Spec"]))
    spec.setdefault("Mode", {}).setdefault("Replicated", {})["Replicas"] = replicas
    version = inspected["Version"]
    assert isinstance(version, dict)
    return json.dumps(spec).encode(), int(version["Index"])


def query_of(path: str) -> str:
    return urlsplit(path).query


async def verify(engine: Engine, policy: SwarmPolicy, need: Need) -> str | None:
    """Look up what an allowed request touches: a refusal unless it is the policy's service or a
    replica of it."""
    if need.kind == "container":
        status, body = await engine("GET", f"/containers/{quote(need.target)}/json")
        if status != 200 or not is_replica(json.loads(body), policy):
            return f"container {need.target} is not a replica of {policy.service}"
        return None
    status, body = await engine("GET", f"/services/{quote(need.target)}")
    if status != 200 or not is_service(json.loads(body), policy):
        return f"service {need.target} is not {policy.service}, the one service the spawner may scale"
    return None


async def scale(engine: Engine, policy: SwarmPolicy, need: Need) -> tuple[int, bytes]:
    """The update the proxy sends itself: the service's current spec, only the replica count changed."""
    _, current = await engine("GET", f"/services/{quote(need.target)}")
    spec, version = scaled_spec(json.loads(current), need.replicas)
    status, answer = await engine("POST", f"/services/{quote(need.target)}/update?version={version}", spec)
    log.info("scaled %s to %d: HTTP %d", policy.service, need.replicas, status)
    return status, answer
