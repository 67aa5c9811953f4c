"""The ``local`` spawner: ``casperd up``'s supervisor starts and stops the peer processes.

The policeman cannot start processes of the local mesh itself (the supervisor holds their keys,
ports, logs and restarts), so the two halves meet on the policeman's control socket:

* the policeman's :class:`LocalSpawner` queues *orders* (spawn NODE as ROLE, retire NODE);
* the supervisor's :class:`LocalSupervisor` polls the ``spawner-orders`` operation every loop,
  reports the spawned nodes it runs and the outcome of the orders it carried out, and gets the
  open orders back. A retire is a SIGTERM: the node drains (it holds nothing by then) and exits.

An order nobody takes (a mesh not started by ``casperd up``) is given up by the autoscaler after
``autoscale_spawn_timeout_s``.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from casperd.errors import CasperError
from casperd.spawners.base import Spawner

if TYPE_CHECKING:
    from casperd.localmesh import LocalMesh

log = logging.getLogger("casperd.spawners.local")


class LocalSpawner(Spawner):
    kind = "local"

    def __init__(self) -> None:
        self._seq = itertools.count(1)
        self.orders: dict[int, dict[str, Any]] = {}
        self.running: set[str] = set()
        self.ordered: set[str] = set()
        self.on_failed: Callable[[str, str], None] | None = None
        self.supervisor_seen = False

    async def spawn(self, node_id: str, role: str, capabilities: list[str]) -> str:
        seq = next(self._seq)
        self.orders[seq] = {"seq": seq, "op": "spawn", "node_id": node_id, "role": role, "capabilities": capabilities}
        self.ordered.add(node_id)
        return node_id

    async def retire(self, node_id: str) -> None:
        seq = next(self._seq)
        self.orders[seq] = {"seq": seq, "op": "retire", "node_id": node_id}

    def spawned(self) -> set[str]:
        return self.running | self.ordered

    def exchange(self, args: dict[str, Any]) -> dict[str, Any]:
        """The supervisor's poll: its spawned nodes and finished orders in, the open orders out."""
        self.supervisor_seen = True
        running = args.get("running", [])
        if isinstance(running, list):
            self.running = {str(n) for n in running}
        for done in args.get("done", []) if isinstance(args.get("done"), list) else []:
            order = self.orders.pop(int(done.get("seq", -1)), None)
            if order is None:
                continue
            self.ordered.discard(order["node_id"])
            if not done.get("ok", False):
                why = str(done.get("error", "unknown"))[:500]
                log.warning("casperd up could not %s %s: %s", order["op"], order["node_id"], why)
                if order["op"] == "spawn" and self.on_failed is not None:
                    self.on_failed(order["node_id"], why)
        return {"orders": list(self.orders.values())}

    def view(self) -> dict[str, Any]:
        return {**super().view(), "open_orders": len(self.orders), "supervisor": self.supervisor_seen}


class LocalSupervisor:
    """The ``casperd up`` half: carries out the policeman's orders on a :class:`LocalMesh`."""

    def __init__(self, mesh: LocalMesh, say: Callable[[str], None] = log.info) -> None:
        self.mesh = mesh
        self.say = say
        self.spawned: set[str] = set()
        self.done: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, every_s: float = 0.3) -> None:
        """Poll in a thread of its own until :meth:`stop` (casperd up's main thread is busy)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="spawner", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a bug must not end the autoscaler's hands silently
                log.exception("casperd up: carrying out the autoscaler's orders failed")
            self._stop.wait(every_s)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(60)
            self._thread = None

    def poll(self) -> int:
        """One exchange with the policeman; returns how many orders were carried out."""
        running = [n for n in self.spawned if n in self.mesh.nodes and self.mesh.nodes[n].alive]
        try:
            with self.mesh.client(5.0) as c:
                reply = c.request("spawner-orders", running=running, done=self.done)
        except CasperError as exc:
            log.debug("spawner-orders: %s", exc)
            return 0
        self.done = []
        for order in reply.get("orders", []):
            self.done.append(self._carry_out(order))
        if self.done:
            self.mesh.write_description()
        return len(self.done)

    def _carry_out(self, order: dict[str, Any]) -> dict[str, Any]:
        node_id = str(order["node_id"])
        try:
            if order["op"] == "spawn":
                if node_id not in self.mesh.nodes:
                    port = self.free_port()
                    caps = ",".join(order.get("capabilities") or [])
                    self.mesh.add_node(node_id, str(order["role"]), port, capabilities=caps)
                    self.spawned.add(node_id)
                    self.say(f"autoscaler: started {node_id} ({order['role']}) on port {port}")
            elif order["op"] == "retire" and node_id in self.spawned:
                code = self.mesh.stop_node(node_id)
                self.mesh.nodes.pop(node_id, None)
                self.spawned.discard(node_id)
                self.say(f"autoscaler: retired {node_id} (exit code {code})")
            return {"seq": order["seq"], "ok": True}
        except (OSError, CasperError, KeyError) as exc:
            return {"seq": order.get("seq", -1), "ok": False, "error": str(exc)}

    def free_port(self) -> int:
        used = {int(n.bind.rsplit(":", 1)[1]) for n in self.mesh.nodes.values()}
        reserved = {self.mesh.port_base + 100, self.mesh.port_base + 101}
        for port in range(self.mesh.port_base + 1, self.mesh.port_base + 1000):
            if port in used or port in reserved:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
        raise OSError(f"no free port above {self.mesh.port_base} for a new node")
