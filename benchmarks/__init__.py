"""Benchmarks of the real federation (three processes, gRPC through the
assistant, 2048-bit keys) and of the crypto backends' primitives.

`python -m benchmarks.bench --help`; `make bench` runs every workload and
writes benchmarks/results.json, BENCHMARKS.md and benchmarks/scaling.png.
"""
