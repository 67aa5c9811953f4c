"""What a drained burst leaves behind (issue #13: the policeman's memory after a burst): the
per-task tables give their size back, the dispatcher drops the heap entries of removed tasks, the
row encoder's memos empty — and nothing that is still open is lost."""

from __future__ import annotations

import sys
import uuid

from casperd import storerows
from casperd.dispatch import Dispatcher, PeerSlot, shrink
from casperd.lifecycle import Status
from casperd.messages import TaskSpec
from tests.support.corelab import Lab


def test_shrink_gives_a_grown_table_back_and_keeps_what_it_holds() -> None:
    d = {i: str(i) for i in range(20_000)}
    s = set(range(20_000))
    grown = sys.getsizeof(d), sys.getsizeof(s)
    for i in range(19_990):
        del d[i]
        s.discard(i)
    assert (sys.getsizeof(d), sys.getsizeof(s)) == grown  # a dict or set never shrinks by itself
    shrink(d)
    shrink(s)
    assert sys.getsizeof(d) < grown[0] // 50 and sys.getsizeof(s) < grown[1] // 50
    assert d == {i: str(i) for i in range(19_990, 20_000)} and s == set(range(19_990, 20_000))


def test_dispatcher_compact_drops_removed_entries_and_keeps_the_order() -> None:
    d = Dispatcher()
    ids = [uuid.UUID(int=i + 1) for i in range(1000)]
    for i, tid in enumerate(ids):
        d.push(tid, priority=i % 3, requires=("gpu",) if i % 2 else ())
    for tid in ids[:900]:
        d.remove(tid)
    d.push(ids[5], priority=9)  # removed, then pushed again: its new entry is the live one
    d.compact()
    assert sum(len(h) for h in d._queues.values()) == len(d) == 101
    peer = PeerSlot("p", frozenset({"gpu"}), 1)
    order = []
    while got := d.assign({"p": peer}, 0.0):
        order.append(got[0][0])
        peer.inflight = 0
    assert order[0] == ids[5] and sorted(order) == sorted([ids[5], *ids[900:]])
    d.compact()
    assert not d._queues and not d._where


def test_the_core_compacts_after_a_burst_and_goes_on_working() -> None:
    lab = Lab()
    w = lab.add_worker("developer-1", capacity=50)
    lab.pump()
    ids = lab.submit(*(TaskSpec(type="echo", input={"i": i}) for i in range(2000)))
    lab.pump()
    while any(lab.status(t) is not Status.COMPLETE for t in ids):
        lab.pump()
        for tid in list(w.runs):
            w.finish(tid, {"i": 0})
        lab.pump()
    grown = sys.getsizeof(lab.core.tasks)
    assert not lab.core.tasks
    lab.core.compact()
    assert sys.getsizeof(lab.core.tasks) < grown // 50
    (tid,) = lab.submit(TaskSpec(type="echo", input={"after": True}))
    lab.pump()
    w.finish(tid, {"ok": 1})
    lab.pump()
    assert lab.status(tid) is Status.COMPLETE


def test_forget_memos_empties_every_memo_of_the_row_encoder() -> None:
    assert storerows._id_text(uuid.UUID(int=7).int) == str(uuid.UUID(int=7))
    assert any(storerows._MEMOS)
    storerows.forget_memos()
    assert not any(storerows._MEMOS)
    assert storerows._id_text(uuid.UUID(int=7).int) == str(uuid.UUID(int=7))  # and fills again on use
