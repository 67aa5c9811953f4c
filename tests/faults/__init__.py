"""Fault tier: a multi-host mesh on network namespaces, with injected faults."""
