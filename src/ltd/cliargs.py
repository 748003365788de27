"""Command-line flags that several commands share (generate, demo, bench, serve, RL).

One definition per flag keeps their names, choices and help identical everywhere.
Torch-free, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from ltd.defaults import DEFAULT_HEAD_DTYPE, DEFAULT_KERNELS, HEAD_DTYPE_HELP, HEAD_DTYPES, KERNEL_MODES, KERNELS_HELP

ONLINE_HELP = (
    "adapt the drafter while {doing}: the EAGLE-3 head's weights (plain, optimistic, hedge), "
    "a kNN memory of the head's states labelled by the target (knn), "
    "the n-gram drafter's memory of served sequences (memory), or several joined by + (e.g. knn+memory)"
)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """``--kernels`` and ``--head-dtype``: how our forwards run (never what they output)."""
    p.add_argument("--kernels", default=DEFAULT_KERNELS, choices=KERNEL_MODES, help=KERNELS_HELP)
    p.add_argument("--head-dtype", default=DEFAULT_HEAD_DTYPE, choices=HEAD_DTYPES, help=HEAD_DTYPE_HELP)


def add_online_args(p: argparse.ArgumentParser, doing: str, state_help: str) -> None:
    """``--online VARIANT`` and ``--online-state DIR``."""
    from ltd.online.adapter import VARIANTS

    p.add_argument("--online", default=None, choices=VARIANTS, help=ONLINE_HELP.format(doing=doing))
    p.add_argument("--online-state", default=None, help=state_help)
