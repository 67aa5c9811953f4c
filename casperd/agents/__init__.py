"""Claude-backed work: the model client, the developer's tool loop, the tester, validation, planning
and the policeman's job coordinator. The mesh core (casperd/*.py) knows nothing of Claude; these
modules plug into it as task types and broker hooks."""
