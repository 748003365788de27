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


class ComputeThread:
    """One thread that runs a process's multi-threaded torch work, for callers on other threads.

    Why: torch's CPU kernels run on an OpenMP team per calling thread (GNU libgomp here),
    and a team's workers stay alive with their thread. Once two threads have run
    multi-threaded torch work, libgomp manages more threads than there are cores and stops
    spinning between parallel regions: every region then waits on a futex wake-up, and a
    SmolLM2 forward of one token took 122 ms on a server's decode thread against 87 ms on
    the thread that loaded the model (AMD EPYC, 2 threads). A server decodes on other
    threads than the one that loads, so it keeps its main thread at one torch thread and
    sends the loading and every forward here: one team, at full speed.

    Not a ``ThreadPoolExecutor(max_workers=1)``: its worker is joined at interpreter exit,
    so a Ctrl-C while a server loads would wait for the load to finish; this thread is a
    daemon, and a call from the compute thread itself runs in place instead of deadlocking.
    """

    def __init__(self, threads: int) -> None:
        import queue
        import threading

        if threads < 1:
            raise LtdError(f"--threads must be at least 1, got {threads}")
        self.threads = threads
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="ltd-compute", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import torch

        torch.set_num_threads(self.threads)  # per thread: this one's team
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, kwargs, box, done = job
            try:
                box.append((True, fn(*args, **kwargs)))
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
            done.set()

    @property
    def is_current(self) -> bool:
        import threading

        return threading.current_thread() is self._thread

    def call(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the compute thread and return (or raise) its result.
        Called from the compute thread itself, it runs in place."""
        import threading

        if self.is_current:
            return fn(*args, **kwargs)
        box: list = []
        done = threading.Event()
        self._jobs.put((fn, args, kwargs, box, done))
        # short waits: a signal meant for the caller (Ctrl-C while a server loads) may be
        # delivered to another thread, and the main thread runs Python's handler only
        # when it wakes
        while not done.wait(0.05):
            pass
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self._jobs.put(None)


_COMPUTE: ComputeThread | None = None


def enable_compute_thread(threads: int | None = None) -> ComputeThread:
    """Route this process's torch work through one :class:`ComputeThread` (``threads``
    torch threads, default the current setting) and leave the calling thread one torch
    thread. Call it before any model work: a thread that already ran multi-threaded
    work keeps its OpenMP team."""
    import torch

    global _COMPUTE
    if _COMPUTE is None:
        _COMPUTE = ComputeThread(threads or torch.get_num_threads())
        torch.set_num_threads(1)
    return _COMPUTE


def compute_thread() -> ComputeThread | None:
    """The process's compute thread, if :func:`enable_compute_thread` made one."""
    return _COMPUTE


def on_compute_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on the compute thread if there is one, else here."""
    return _COMPUTE.call(fn, *args, **kwargs) if _COMPUTE is not None else fn(*args, **kwargs)


def lane_threads() -> None:
    """Called by a thread that does a batch lane's own work (drafting, acceptance) beside
    the compute thread: one torch thread, so that it starts no OpenMP team of its own."""
    if _COMPUTE is not None and not _COMPUTE.is_current:
        import torch

        torch.set_num_threads(1)
