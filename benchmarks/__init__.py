"""Benchmarks of bnjax against its peers and the memory-bandwidth floor.

`python -m benchmarks.ops` times the batch-norm operation itself; `python -m benchmarks.train` times whole
training steps of an MLP. Both share the timing, statistics and report code in `benchmarks._harness`.
"""
