"""The security tier: attacks replayed against real nodes (marked ``security`` by tests/conftest.py).

The mesh fixtures are the integration tier's (real Postgres, real casperd processes on loopback)."""

from __future__ import annotations

from tests.integration.conftest import database_url, make_mesh, postgres

__all__ = ["database_url", "make_mesh", "postgres"]
