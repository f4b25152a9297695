"""A task's peak memory, as the machine counts it: what "memory per task" goals are read from."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start counting this process's peak RSS afresh (Linux: ``clear_refs`` 5), so a task that
    runs in a long-lived process (``dag.test()``, a reused worker) reports its own peak, not an
    earlier task's. False where the kernel does not allow it (the peak then spans the process)."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset (VmHWM), else since the process started."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def limit_threads(threads: int, *, load_torch: bool = False) -> None:
    """Keep torch and TensorFlow, if this process has loaded them, to ``threads`` CPU threads: a
    task gets its share of the host (RECSKETCH_THREADS), not every core while other tasks run
    beside it. Imports neither (an exported-graph worker runs without them) unless ``load_torch``
    asks for torch, which the neighbours kernel will load anyway. A backbone
    loaded later is given its threads explicitly (``create_backbone(settings, threads)``)."""
    import sys

    if load_torch:  # a stage that will use it (the neighbours kernel) loads it first, so that it is kept too
        with contextlib.suppress(ImportError):
            import torch  # noqa: F401
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(min(threads, 2))
        except RuntimeError:  # TensorFlow already started: it keeps what it has
            pass
