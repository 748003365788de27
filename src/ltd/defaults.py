"""Default static tree shape, importable without torch (the CLI and server parsers use it).

The best static tree of `ltd bench --grid` for smollm2's default drafter (hybrid@1) on this
project's CPU machine, with the measured kernel plan of ltd.backends.hf_kernels
(benchmarks/smollm2-grid-at1); other hardware and drafters should run the grid.
"""

DEFAULT_DEPTH = 2
DEFAULT_TOPK = 8
DEFAULT_SIZE = 3

# The hf backend's matmul plan (ltd.backends.hf_kernels), named here so parsers need no torch.
KERNEL_MODES = ("auto", "stock", "retune")
DEFAULT_KERNELS = "auto"
KERNELS_HELP = (
    "hf backend matmul kernels of verification: auto (measured once per machine and cached), "
    "stock (F.linear), retune (measure again) (default auto)"
)
