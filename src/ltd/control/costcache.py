"""The quick cost profile, measured once per machine and cached like the kernel plan.

Cost-aware methods (``greedy``) decide from this machine's measured costs. The first
time one runs for a (machine, model, backend, dtype, threads, drafter, branching)
combination, :func:`cached_quick_profile` measures a small cost table
(:func:`ltd.control.measure.quick_profile`) and writes it atomically under the user
cache directory (``$LTD_CACHE`` or ``~/.cache/ltd``, in ``costs/``); later runs read it.
The key is stored in the file too, so a file copied from another machine, or edited,
is measured again rather than trusted. A full ``ltd profile`` file can be given
instead (``--latency PATH``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ltd.control.costs import LatencyModel
from ltd.control.measure import quick_profile
from ltd.errors import LtdError
from ltd.fetch import keyed_cache_file
from ltd.fileio import atomic_write_json, read_json
from ltd.machine import cpu_model, machine_info
from ltd.runtime import compute_thread, on_compute_thread

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def backend_threads(backend) -> int:
    """The CPU threads a backend's forwards use (llama.cpp's own count, else torch's: the
    compute thread's where a server made one, since every forward runs there)."""
    compute = compute_thread()
    return int(getattr(backend, "threads", None) or (compute.threads if compute else torch.get_num_threads()))


def cost_key(backend, model: str, backend_name: str, drafter: str, topk: int) -> dict:
    """What a quick profile depends on: machine, model, backend (and llama.cpp's build), dtype,
    threads, drafter, k."""
    return {
        "cpu_model": cpu_model(),
        "model": model,
        "backend": backend_name,
        "dtype": str(getattr(backend, "dtype", "")).replace("torch.", ""),
        "device": str(getattr(backend, "device", "cpu")),
        "threads": backend_threads(backend),
        "drafter": drafter,
        "topk": int(topk),
        "version": CACHE_VERSION,
        # llama.cpp's exact kernels verify at other costs than the stock build's
        **({"exact_kernels": bool(backend.exact)} if backend_name == "llamacpp" and hasattr(backend, "exact") else {}),
    }


def cost_path(key: dict) -> Path:
    """``<cache>/costs/<model>-<backend>-t<threads>-<digest>.json``: readable, and unique per key."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(key["model"]).name or "model")
    return keyed_cache_file("costs", f"{name}-{key['backend']}-t{key['threads']}", key)


def read_cached(path: Path, key: dict) -> LatencyModel | None:
    """The cached profile at ``path`` if it is readable and made for ``key``, else None
    (with a warning when a file is there but unusable: it is then measured again)."""
    if not path.is_file():
        return None
    try:
        costs = LatencyModel.from_json(read_json(path, "cost profile"), where=str(path))
    except (LtdError, ValueError, TypeError) as exc:
        log.warning("cost profile %s is unusable (%s); measuring this machine again", path, exc)
        return None
    if costs.machine.get("cost_key") != key:
        log.warning("cost profile %s was made for another machine or setup; measuring again", path)
        return None
    return costs


def cached_quick_profile(backend, drafter, *, model: str, backend_name: str, drafter_name: str, topk: int,
                         refresh: bool = False) -> LatencyModel:
    """This machine's quick cost profile for the engine's target and drafter: read from the
    cache, else measured (about a second on a 135M model, at most ~30 s) and cached."""
    key = cost_key(backend, model, backend_name, drafter_name, topk)
    path = cost_path(key)
    if not refresh:
        cached = read_cached(path, key)
        if cached is not None:
            return cached
    log.info("measuring this machine's cycle costs for %s on %s (once; cached in %s)", model, backend_name, path)
    machine = {**machine_info(key["dtype"], key["device"]), "cost_key": key}
    # measured where the forwards run (a batch lane asking first must not measure its own one thread)
    costs = on_compute_thread(quick_profile, backend, drafter, topk=topk, model_name=model, drafter_name=drafter_name,
                              machine=machine)
    try:
        atomic_write_json(path, costs.to_json())
    except OSError as exc:  # a read-only cache must not stop decoding: measure again next time
        log.warning("could not cache the cost profile in %s (%s)", path, exc)
    return costs
