"""Shared library of the vfl services: crypto, protocol steps, data, serde, rpc."""
