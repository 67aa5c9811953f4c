"""Hints for failures that give no error of their own (pure: text from facts).

A worker whose broker never answers cannot tell why: ZeroMQ drops a plain connection to a Curve
server, and a Curve handshake with the wrong server key, without a word to either side. The worker
says what it can check instead of looping silently.
"""

from __future__ import annotations


def silent_broker_hint(broker: str, curve: bool, registered: bool, reconnects: int) -> str | None:
    """What to check when the broker stays silent; None while it may be a passing hiccup."""
    if registered or reconnects < 2:
        return None
    if not curve:
        return (
            f"hint: no answer from the broker at {broker}. Is the policeman running there? If it uses Curve "
            "(casperd up does), this node must too: set --curve with --broker-public-key-file (and its own "
            "key files); ZeroMQ drops plain connections to a Curve server without an error"
        )
    return (
        f"hint: no answer from the broker at {broker}. Is the policeman running there, with Curve on? Check that "
        "--broker-public-key-file holds the policeman's current public key: a wrong key fails the Curve handshake "
        "without an error"
    )
