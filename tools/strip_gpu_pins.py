"""Drop CUDA-only pins from a uv-compiled lock read on stdin.

uv resolves ``torch`` against the registry, whose Linux wheel pulls in several GB of CUDA
libraries. recsketch installs torch's CPU wheel (pip's find-links) instead, which needs
none of them, so their pins are removed from ``requirements.txt``.
"""

from __future__ import annotations

import re
import sys

GPU_ONLY = re.compile(r"^(nvidia-[\w-]+|cuda-[\w-]+|triton)==")


def strip(lines: list[str]) -> list[str]:
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line and not line[0].isspace():
            skipping = bool(GPU_ONLY.match(line))
        if not skipping:
            kept.append(line)
    return kept


if __name__ == "__main__":
    sys.stdout.write("".join(strip(sys.stdin.readlines())))
