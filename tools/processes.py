"""What every launcher here shares: children in their own process groups, and a stop that
reaches all of them whether it came as Ctrl-C (SIGINT) or as SIGTERM from a supervisor.

``signal.sigwait`` on signals that were never blocked returns nothing on SIGTERM: the
default action kills the launcher first and its children live on as orphans. Here SIGTERM
raises :class:`Stopped` instead, so the ``finally`` that stops the children always runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path


class Stopped(BaseException):
    """SIGTERM or SIGINT arrived: unwind and stop what was started."""


def _raise_stopped(signum: int, _frame: object) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block SIGTERM and SIGINT raise :class:`Stopped` (restored afterwards)."""
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT (inside :func:`stop_on_signals`)."""
    try:
        while True:
            signal.pause()
    except Stopped:
        return


def serve_until_stopped(start: Callable[[], str], stop: Callable[[], None]) -> int:
    """A launcher's main loop: ``start()`` (its return value is printed, with how to stop it),
    then wait; SIGTERM or Ctrl-C, at any point, ends in ``stop()``."""
    with stop_on_signals():
        try:
            print(f"{start()}\nCtrl-C or SIGTERM stops it.", flush=True)
            wait_for_stop()
        except Stopped:
            pass
        finally:
            stop()
    return 0


class ProcessGroup:
    """Child processes, each the leader of its own session, stopped together."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: Sequence[str], *, env: dict[str, str] | None = None,
              log: Path | None = None, cwd: Path | None = None) -> subprocess.Popen:
        output = log.open("ab") if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(list(args), env=env, stdout=output, stderr=subprocess.STDOUT, cwd=cwd,
                                   start_new_session=True)
        self.processes[name] = process
        return process

    def check_alive(self, logs: Path | None = None) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:] if logs else ""
                raise RuntimeError(f"{name} exited with {process.returncode}: {tail}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one child's whole group (a SIGKILLed Celery worker takes its task processes with it)."""
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, sig)
            process.wait()

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM every child's group, then SIGKILL what is left after ``timeout_s``."""
        for process in self.processes.values():
            if process.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in self.processes.values():
            with suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def pids(self) -> list[int]:
        return [process.pid for process in self.processes.values()]
