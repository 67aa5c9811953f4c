"""A Docker socket proxy that lets the policeman do exactly what the docker spawner needs.

The Docker socket is root on the host, so the policeman never gets it. This proxy (``python -m
casperd.spawners.proxy``, in the casper image; opt-in through ``compose.spawner.yaml``) holds the
socket and forwards a request only if :func:`check` allows it:

* read-only: ``GET /_ping``, ``/version``, ``/info``, ``/containers/json``, ``/containers/ID/json``,
  ``/networks/ID`` (to find the template and free addresses);
* ``POST /containers/create`` of the casper image only (``PROXY_IMAGE``), labelled
  ``casper.spawned=true`` and with the proxy's own compose project, attached only to that
  project's ``claude-net`` / ``claude-internal``, started as ``0:0`` with the image's own entrypoint
  (which becomes casper at once), ``CapDrop: [ALL]`` and no capability added beyond SETUID,
  SETGID, CHOWN and KILL (casperd's, to run task code as casper-task), ``no-new-privileges`` and
  no other security option, no privileged mode, devices or host namespaces, and bind mounts only
  of files the template container mounts read-only (its secrets, but not its own key pair) and of
  the developer pool's key pair (which ``compose.spawner.yaml`` mounts into the proxy), plus the
  project's ``repos`` volume;
* ``POST /containers/ID/start``, ``/stop``, ``/wait`` and ``DELETE /containers/ID`` of a container
  labelled ``casper.spawned=true`` in the same project (looked up before the request goes on).

Everything else (exec, images, volumes, build, swarm, plugins, ...) is refused with 403 and a
message naming the rule. One request per connection (``Connection: close``).

When the proxy's own container belongs to a Swarm stack, it runs in swarm mode instead: it lets
the ``swarm`` spawner scale the stack's developer service and nothing else (the rules are in
:mod:`casperd.spawners.swarmproxy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from casperd.spawners.swarmproxy import STACK_LABEL, SwarmPolicy, check_swarm, query_of, scale, verify

log = logging.getLogger("casperd.spawners.proxy")

SPAWNED_LABEL = "casper.spawned"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
_VERSION = re.compile(r"^/v\d+(\.\d+)?")
_ID = r"[A-Za-z0-9_.-]+"
_READ_ONLY = [
    re.compile(p) for p in (r"^/_ping$", r"^/version$", r"^/info$", r"^/containers/json$", rf"^/containers/{_ID}/json$")
]
_NETWORK = re.compile(rf"^/networks/({_ID})$")
_LIFECYCLE = re.compile(rf"^/containers/({_ID})/(start|stop|wait)$")
_REMOVE = re.compile(rf"^/containers/({_ID})$")
TASK_USER_CAPS = ("SETUID", "SETGID", "CHOWN", "KILL")
"""What the entrypoint keeps for casperd (containers/entrypoint.sh); a spawned container gets no more."""
_ALLOWED_HOST_CONFIG = {
    "Binds",
    "Mounts",
    "NetworkMode",
    "RestartPolicy",
    "LogConfig",
    "Init",
    "ReadonlyRootfs",
    "Tmpfs",
    "CapAdd",
    "CapDrop",
    "SecurityOpt",
    "Memory",
    "MemoryReservation",
    "NanoCpus",
    "CpuShares",
    "PidsLimit",
}


POOL_KEY = "/run/secrets/developer-pool.key"
POOL_PUB = "/run/secrets/developer-pool.pub"
"""Where compose.spawner.yaml mounts the developer pool's key pair into the proxy (which never reads
them: they are casper's 0400 files): their host paths are the ones a spawned developer may get."""
NODE_KEY_FILES = ("/run/secrets/curve.key", "/run/secrets/curve.pub")
"""A node's own key pair in its container: the template's is developer-1's, never handed on."""


@dataclass
class Policy:
    image: str
    project: str
    template_binds: set[str] = field(default_factory=set)
    """Host paths a spawned container may bind-mount read-only: the template's secrets (not its own
    key pair) and the developer pool's key pair."""

    @property
    def networks(self) -> set[str]:
        return {f"{self.project}_claude-net", f"{self.project}_claude-internal"}


def allowed_binds(template_mounts: list[dict[str, Any]], own_mounts: list[dict[str, Any]]) -> set[str]:
    """The template's read-only bind mounts but its key pair, and the pool key pair mounted here."""
    binds = {
        m["Source"]
        for m in template_mounts
        if m.get("Type") == "bind" and not m.get("RW", True) and m.get("Destination") not in NODE_KEY_FILES
    }
    binds |= {
        m["Source"] for m in own_mounts if m.get("Type") == "bind" and m.get("Destination") in (POOL_KEY, POOL_PUB)
    }
    return binds


def route(path: str) -> str:
    return _VERSION.sub("", urlsplit(path).path)


def check(method: str, path: str, body: bytes, policy: Policy) -> tuple[str | None, str | None]:
    """(refusal, container id to verify): a refusal message, or None and, for a lifecycle call,
    the container that must be a spawned one of this project."""
    p = route(path)
    if method in ("GET", "HEAD"):
        if any(r.match(p) for r in _READ_ONLY):
            return None, None
        m = _NETWORK.match(p)
        if m and m.group(1) in policy.networks:
            return None, None
        return f"GET {p} is not among the read-only calls the spawner needs", None
    if method == "POST" and p == "/containers/create":
        return check_create(body, policy), None
    if method == "POST" and (m := _LIFECYCLE.match(p)):
        return None, m.group(1)
    if method == "DELETE" and (m := _REMOVE.match(p)):
        return None, m.group(1)
    return f"{method} {p} is not allowed: the proxy grants create/start/stop/remove of spawned casper containers", None


def check_create(body: bytes, policy: Policy) -> str | None:
    try:
        spec = json.loads(body or b"{}")
    except ValueError:
        return "the create body is not JSON"
    if not isinstance(spec, dict):
        return "the create body is not a JSON object"
    if spec.get("Image") != policy.image:
        return f"image {spec.get('Image')!r} is not the casper image {policy.image!r}"
    labels = spec.get("Labels") or {}
    if labels.get(SPAWNED_LABEL) != "true" or labels.get(PROJECT_LABEL) != policy.project:
        return f"a spawned container must carry {SPAWNED_LABEL}=true and {PROJECT_LABEL}={policy.project}"
    if str(spec.get("User", "")) != "0:0":
        return "a spawned container starts as 0:0 and the image's entrypoint makes it casper; no other user"
    for key in ("Entrypoint", "Volumes", "ExposedPorts"):
        if spec.get(key):
            return f"{key} may not be set"
    host = spec.get("HostConfig") or {}
    extra = set(host) - _ALLOWED_HOST_CONFIG
    bad = sorted(k for k in extra if host.get(k) not in (None, "", [], {}, False, 0))
    if bad:
        return f"HostConfig.{bad[0]} is not allowed"
    if host.get("NetworkMode") not in policy.networks:
        return f"network mode {host.get('NetworkMode')!r} is not this mesh's network"
    if (host.get("SecurityOpt") or []) != ["no-new-privileges:true"]:
        return "exactly the no-new-privileges security option is required"
    if [str(c).upper().removeprefix("CAP_") for c in host.get("CapDrop") or []] != ["ALL"]:
        return "a spawned container drops every capability (CapDrop: [ALL])"
    added = {str(c).upper().removeprefix("CAP_") for c in host.get("CapAdd") or []}
    if added - set(TASK_USER_CAPS):
        return f"CapAdd {sorted(added - set(TASK_USER_CAPS))} is not allowed: only {', '.join(TASK_USER_CAPS)}"
    for bind in host.get("Binds") or []:
        parts = str(bind).split(":")
        source = parts[0]
        if source.startswith("/"):
            if source not in policy.template_binds or len(parts) < 3 or "ro" not in parts[2].split(","):
                return f"bind mount of {source} is not one of the template's read-only secrets"
        elif source != f"{policy.project}_repos":
            return f"volume {source} is not the mesh's repos volume"
    for mount in host.get("Mounts") or []:
        if mount.get("Type") != "volume" or mount.get("Source"):
            return "only anonymous volumes may be mounted"
    endpoints = (spec.get("NetworkingConfig") or {}).get("EndpointsConfig") or {}
    if set(endpoints) - policy.networks:
        return f"networks {sorted(set(endpoints) - policy.networks)} are not this mesh's"
    return None


# --- the server ----------------------------------------------------------------------------------
async def _docker(sock: str, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request on the real socket (the proxy's own lookups)."""
    reader, writer = await asyncio.open_unix_connection(sock)
    head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head_b, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head_b.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_b.lower():
        payload = _dechunk(payload)
    return status, payload


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


class Proxy:
    def __init__(self, sock: str, image: str, template: str) -> None:
        self.sock = sock
        self.image = image
        self.template = template
        self.policy: Policy | None = None
        self.swarm: SwarmPolicy | None = None

    async def _own(self) -> dict[str, Any]:
        hostname = os.uname().nodename
        status, body = await _docker(self.sock, "GET", f"/containers/{hostname}/json")
        if status != 200:
            raise RuntimeError(f"cannot inspect the proxy's own container {hostname}: HTTP {status}")
        return dict(json.loads(body))

    async def load_swarm_policy(self) -> SwarmPolicy | None:
        """Swarm mode when the proxy's own container belongs to a stack."""
        stack = ((await self._own())["Config"]["Labels"] or {}).get(STACK_LABEL, "")
        if not stack:
            return None
        service = os.environ.get("PROXY_SERVICE") or f"{stack}_developer"
        self.swarm = SwarmPolicy(stack, service, int(os.environ.get("PROXY_MAX_REPLICAS", "10")))
        log.info("proxy for stack %s: scales %s up to %d replicas", stack, service, self.swarm.max_replicas)
        return self.swarm

    async def load_policy(self) -> Policy:
        """The proxy's own project (its container's label) and the template's secret mounts."""
        me = await self._own()
        project = (me["Config"]["Labels"] or {}).get(PROJECT_LABEL, "")
        flt = json.dumps({"label": [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={self.template}"]})
        status, body = await _docker(self.sock, "GET", f"/containers/json?all=1&filters={quote(flt)}")
        binds: set[str] = set()
        for c in json.loads(body) if status == 200 else []:
            binds |= allowed_binds(c.get("Mounts", []), me.get("Mounts") or [])
        self.policy = Policy(self.image, project, binds)
        log.info("proxy for project %s: image %s, %d template secrets", project, self.image, len(binds))
        return self.policy

    async def _spawned(self, cid: str) -> bool:
        status, body = await _docker(self.sock, "GET", f"/containers/{cid}/json")
        if status != 200:
            return False
        labels = json.loads(body).get("Config", {}).get("Labels") or {}
        assert self.policy is not None
        return labels.get(SPAWNED_LABEL) == "true" and labels.get(PROJECT_LABEL) == self.policy.project

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:  # a connect and close (the healthcheck): nothing to answer
                    return
                raise
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            length = int(headers.get("content-length", "0") or 0)
            if length > 1_000_000:
                await _answer(writer, 413, "request body too large")
                return
            body = await reader.readexactly(length) if length else b""
            if self.swarm is not None:
                await self._handle_swarm(self.swarm, method, path, headers, body, writer)
                return
            creating = method == "POST" and route(path) == "/containers/create"
            # the template's mounts are read again for every create: the template may have
            # started after the proxy, or been recreated with other secrets
            policy = await self.load_policy() if creating or self.policy is None else self.policy
            refusal, cid = check(method, path, body, policy)
            if refusal is None and cid is not None and not await self._spawned(cid):
                refusal = f"container {cid} was not spawned by this mesh's policeman"
            if refusal is not None:
                log.warning("refused %s %s: %s", method, route(path), refusal)
                await _answer(writer, 403, refusal)
                return
            await self._forward(method, path, headers, body, writer)
        except (asyncio.IncompleteReadError, ValueError, OSError) as exc:
            log.warning("bad request: %s", exc)
            await _answer(writer, 400, "bad request")
        finally:
            writer.close()

    async def _handle_swarm(
        self,
        policy: SwarmPolicy,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        def engine(method: str, path: str, body: bytes = b"") -> Awaitable[tuple[int, bytes]]:
            return _docker(self.sock, method, path, body)

        refusal, need = check_swarm(method, route(path), query_of(path), body, policy)
        if refusal is None and need is not None:
            refusal = await verify(engine, policy, need)
        if refusal is not None:
            log.warning("refused %s %s: %s", method, route(path), refusal)
            await _answer(writer, 403, refusal)
        elif need is not None and need.kind == "scale":
            await _answer_raw(writer, *await scale(engine, policy, need))
        else:
            await self._forward(method, path, headers, body, writer)

    async def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        up_r, up_w = await asyncio.open_unix_connection(self.sock)
        keep = {k: v for k, v in headers.items() if k in ("content-type", "content-length", "user-agent", "accept")}
        head = f"{method} {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in keep.items())
        up_w.write(head.encode() + b"\r\n" + body)
        await up_w.drain()
        while chunk := await up_r.read(65536):
            writer.write(chunk)
            await writer.drain()
        up_w.close()


async def _answer(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = json.dumps({"message": f"casper docker proxy: {message}"}).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 413: "Payload Too Large"}.get(status, "Error")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def _answer_raw(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    writer.write(
        f"HTTP/1.1 {status} {'OK' if status < 400 else 'Error'}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    with contextlib.suppress(OSError):
        await writer.drain()


async def serve(sock: str, image: str, template: str, port: int) -> None:
    proxy = Proxy(sock, image, template)
    try:
        await proxy.load_swarm_policy()
    except (RuntimeError, OSError, ValueError) as exc:  # compose mode still reads its policy per request
        log.warning("cannot tell whether this proxy runs in a swarm stack (%s); compose rules apply", exc)
    server = await asyncio.start_server(proxy.handle, "0.0.0.0", port)
    log.info("docker proxy on :%d for %s", port, sock)
    async with server:
        await server.serve_forever()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    image = os.environ.get("PROXY_IMAGE", "")
    if not image:
        print("casper docker proxy: set PROXY_IMAGE to the casper image (e.g. casper:latest)", file=sys.stderr)
        return 2
    sock = os.environ.get("PROXY_SOCKET", "/var/run/docker.sock")
    template = os.environ.get("PROXY_TEMPLATE", "developer-1")
    port = int(os.environ.get("PROXY_PORT", "2375"))
    asyncio.run(serve(sock, image, template, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
