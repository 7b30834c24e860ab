"""Where the CUDA toolkit is, for setup.py and CMakeLists.txt alike.

``nvcc`` on PATH may be a wrapper script outside the toolkit; torch would guess CUDA_HOME from the
wrapper's location and fail to link cudart. ``nvcc --dryrun`` prints the toolkit it really runs
as ``TOP=...``. Run as a script, this prints the root (nothing when there is no toolkit).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Optional


def cuda_toolkit() -> Optional[str]:
    """Root of the CUDA toolkit: $CUDA_HOME when set, else the one ``nvcc`` runs; None without nvcc."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.*)$", dryrun.stdout + dryrun.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(nvcc))


if __name__ == "__main__":
    print(cuda_toolkit() or "", end="")
