"""Default static tree shape, importable without torch (the CLI and server parsers use it).

The best static tree of `ltd bench --grid` for smollm2's default drafter (hybrid@1) on this
project's CPU machine, with the measured kernel plan of ltd.backends.hf_kernels
(benchmarks/smollm2-grid-plan2-2026-11-27; also the best of six suites, benchmarks/smollm2-plan2-2026-11-27). On that
machine verifying one draft token cost what a plain step does, so the cheapest tree won;
other hardware and drafters should run the grid or ``ltd tune-policy``.
"""

DEFAULT_DEPTH = 1
DEFAULT_TOPK = 8
DEFAULT_SIZE = 1

# method schedule's draft length by batch size (ltd.control.schedule), as vLLM and
# TensorRT-LLM tables do: shorter drafts as the batch grows, none from 8 sequences on
DEFAULT_SCHEDULE = "1:3,2:2,4:1,8:0"

# The hf backend's matmul plan (ltd.backends.hf_kernels), named here so parsers need no torch.
KERNEL_MODES = ("auto", "stock", "retune")
DEFAULT_KERNELS = "auto"
KERNELS_HELP = (
    "hf backend matmul kernels of verification: auto (measured once per machine and cached), "
    "stock (F.linear), retune (measure again) (default auto)"
)

# Weights of an EAGLE-3 draft head. Drafts never change the output (verification decides),
# so the head's precision is a speed/acceptance trade of its own: on this project's CPU
# (AVX2, no native bf16) the head's root step costs 1.6-2.2 ms in bfloat16 against
# 4.0-6.4 ms in float32, since it is memory-bound, at the same acceptance
# (experiments/head_dtype.py, benchmarks/head-dtype-2026-11-27). auto = bfloat16 (float16 on a GPU
# without bf16); with --online the head learns through float32 master weights.
HEAD_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_HEAD_DTYPE = "auto"
HEAD_DTYPE_HELP = (
    "weights of an EAGLE-3 draft head: auto (bfloat16; float16 on a GPU without bf16), "
    "float32, bfloat16, float16; drafts never change the output (default auto)"
)

# --online variants (ltd.online.adapter), named here so that parsers need no torch.
ONLINE_VARIANTS = ("knn", "memory", "knn+memory")
