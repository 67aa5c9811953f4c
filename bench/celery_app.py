"""Celery application used by the CASPER-vs-Celery benchmark (``bench.celery_side``).

The worker subprocess imports this module (``celery -A bench.celery_app worker``) and builds
its app from environment variables; the benchmark process calls :func:`make_app` directly
with the same settings, so both sides agree on broker, backend, queue and serializer.

Environment variables (worker side):

* ``CASPER_BENCH_BROKER_URL``  - Redis URL of the broker (default ``redis://127.0.0.1:6379/0``)
* ``CASPER_BENCH_BACKEND_URL`` - Redis URL of the result backend (default: same as the broker)
* ``CASPER_BENCH_QUEUE``       - queue name (default ``casper_bench``)

Serializer: JSON for task messages and results (Celery's default, no extra dependency).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

NOOP_TASK_NAME = "bench.noop"
DEFAULT_QUEUE = "casper_bench"
SERIALIZER = "json"


def make_app(broker_url: str, backend_url: str, queue: str = DEFAULT_QUEUE) -> Celery:
    """Build a Celery app pointed at the given Redis broker and result backend."""
    app = Celery("casper_bench", broker=broker_url, backend=backend_url, set_as_current=False)
    app.conf.update(
        task_serializer=SERIALIZER,
        result_serializer=SERIALIZER,
        accept_content=[SERIALIZER],
        result_accept_content=[SERIALIZER],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        task_ignore_result=False,
        task_track_started=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        enable_utc=True,
    )

    @app.task(name=NOOP_TASK_NAME, shared=False)
    def noop(payload: dict[str, Any]) -> dict[str, Any]:
        """Return the payload unchanged: the work is pure messaging overhead."""
        return payload

    return app


_broker = os.environ.get("CASPER_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
app = make_app(
    broker_url=_broker,
    backend_url=os.environ.get("CASPER_BENCH_BACKEND_URL", _broker),
    queue=os.environ.get("CASPER_BENCH_QUEUE", DEFAULT_QUEUE),
)
