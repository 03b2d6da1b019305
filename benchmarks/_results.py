"""What every benchmark result records, and where it is written."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import platform
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"


def versions(*packages: str) -> dict:
    """Python and each package's ``__version__`` (None when it is not installed)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = getattr(importlib.import_module(pkg), "__version__", "unknown")
        except Exception:
            out[pkg] = None
    return out


def dist_versions(*distributions: str) -> dict:
    """Python and each installed distribution's version (None when absent), read from its metadata
    without importing it (importing e.g. Liger-Kernel on a machine without a GPU can fail)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def slug(device: str) -> str:
    """A device name as it appears in result file names: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return "-".join(device.replace("/", " ").split()).lower()


def header(benchmark: str, device: str) -> dict:
    return {"benchmark": benchmark, "device": device, "date": dt.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def write(result: dict, out: Path | None, *, smoke: bool, suffix: str) -> Path | None:
    """Write to ``out``, or by default to results/<date>-<device>-<suffix>.json (never for smoke runs)."""
    if out is None and not smoke:
        out = RESULTS_DIR / f"{result['date']}-{slug(result['device'])}-{suffix}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return out
