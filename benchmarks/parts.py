"""Benchmark parts each in a child process of its own, so that each part's peak RSS is its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_part(module: str, part: str, argv: list[str], work: Path) -> dict:
    """``python -m module *argv --child part --work work``; its ``RESULT {json}`` line, with the
    child's peak RSS (``os.wait4``) as ``peak_rss_gib``."""
    process = subprocess.Popen([sys.executable, "-m", module, *argv, "--child", part, "--work", str(work)],
                               stdout=subprocess.PIPE, text=True)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{part} failed ({status}): {output[-2000:]}")
    result = json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20
    return result
