"""The machine a benchmark ran on: re-exported from :mod:`ltd.machine`, where the
backends (which must not import the bench) find it too."""

from ltd.machine import cpu_model, machine_info, utc_now

__all__ = ["cpu_model", "machine_info", "utc_now"]
