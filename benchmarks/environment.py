"""What a benchmark number was measured on: code, libraries, CPU and threads.

Every result file records ``environment()``, so a number read months later says which edgecap
commit, which onnxruntime and which CPU (with its vector extensions) produced it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("onnxruntime", "numpy", "torch", "transformers", "optimum", "pillow", "tokenizers")
# The CPU flags that decide which int8/bf16 kernels onnxruntime and torch can use.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",
                "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ORT_NUM_THREADS")


def edgecap_commit() -> str:
    """The checked-out commit, with "+dirty" when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return f"{commit}+dirty" if commit and git("status", "--porcelain", "-uno") else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu() -> dict:
    """CPU model and kernel-relevant flags, from /proc/cpuinfo where there is one."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(),
            "flags": sorted(f for f in KERNEL_FLAGS if f in flags)}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def environment(threads: int | None = None) -> dict:
    """The record every benchmark result carries (``threads``: what the run asked for)."""
    return {
        "edgecap_commit": edgecap_commit(), "versions": versions(), "cpu": cpu(),
        "threads": {"requested": threads, "cores_available": len(os.sched_getaffinity(0)),
                    **{v: os.environ.get(v) for v in THREAD_VARIABLES}},
        "platform": platform.platform(), "executable": sys.executable,
    }
