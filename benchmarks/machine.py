"""Where and when a benchmark ran: every results table names the CPU model, the date and the load."""

from __future__ import annotations

import os
import subprocess
from datetime import UTC, datetime


def cpu_model() -> str:
    """``lscpu``'s model name (the figures depend on the host: see issue 18)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown CPU"
    return next((x.split(":", 1)[1].strip() for x in out.splitlines() if x.startswith("Model name")), "?")


# The vector extensions GEMM kernels (torch's, onnxruntime's fp32 and int8) choose between.
_SIMD = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu_features() -> str:
    """The vector extensions this CPU reports (Linux ``/proc/cpuinfo``): int8 and fp32 kernels differ
    by them, so two hosts with the same model name can give different ratios."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((x.split(":", 1)[1].split() for x in f if x.startswith("flags")), [])
    except OSError:
        return "?"
    have = [x.upper() for x in _SIMD if x in flags]
    return ", ".join(have) + "; " + ", ".join(f"no {x.upper()}" for x in _SIMD if x not in flags)


def run_facts(load_at_start: float) -> dict:
    """Date (UTC), CPU model, cores and the 1-minute load average at the start and at the end."""
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpus": os.cpu_count(),
        "load_average_1m_start": round(load_at_start, 2),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
    }


def facts_line(facts: dict) -> str:
    return (
        f"Run {facts['date_utc']} UTC on {facts['cpu_model']} ({facts['cpus']} CPUs; "
        f"{facts.get('cpu_features', '?')}); 1-minute load average "
        f"{facts['load_average_1m_start']:.1f} at the start, {facts['load_average_1m_end']:.1f} at the end."
    )
