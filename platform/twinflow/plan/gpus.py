"""GPU memory sizes by name, and parsing of `--gpu-mem` values such as 80GiB, 141GB or 81559MiB."""

from __future__ import annotations

import re

GIB = 1024**3

#: total memory as nvidia-smi reports it (MiB), per product
GPUS_MIB = {
    "a10g-24g": 23028,
    "l4-24g": 23034,
    "l40s-48g": 46068,
    "a100-40g": 40960,
    "a100-80g": 81920,
    "h100-80g": 81559,
    "h200-141g": 143771,
}

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'80GiB' -> bytes. A bare number is GiB."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or (m.group(2) and m.group(2).lower() not in _UNITS):
        raise ValueError(f"--gpu-mem {text!r}: expected a size such as 80GiB, 141GB or 81559MiB")
    return int(float(m.group(1)) * _UNITS.get(m.group(2).lower() or "gib"))


def gpu_memory(name: str) -> int:
    key = name.lower()
    if key not in GPUS_MIB:
        raise ValueError(
            f"--gpu {name!r}: unknown GPU; known: {', '.join(sorted(GPUS_MIB))} (or use --gpu-mem)"
        )
    return GPUS_MIB[key] * 2**20
