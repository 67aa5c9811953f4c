"""CASPER: a ZeroMQ peer-to-peer mesh daemon that runs a swarm of Claude agents."""

__version__ = "0.1.0"
