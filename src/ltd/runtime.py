"""Process-level runtime settings shared by every command: CPU threads and device checks."""

from __future__ import annotations

from ltd.errors import LtdError


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count (None keeps torch's choice)."""
    if threads is None:
        return
    if threads < 1:
        raise LtdError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def check_device(device: str) -> None:
    """Refuse a CUDA device when this torch build sees no GPU, before any model loads."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LtdError(f"--device {device} asked for CUDA, but this torch build sees no GPU; use --device cpu")
