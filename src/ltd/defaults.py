"""Default static tree shape, importable without torch (the CLI and server parsers use it).

The best static tree of `ltd bench --grid` for the shipped smollm2 head on this project's
CPU machines (benchmarks/smollm2-grid); other hardware and drafters should run the grid.
"""

DEFAULT_DEPTH = 1
DEFAULT_TOPK = 8
DEFAULT_SIZE = 4
