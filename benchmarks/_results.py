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


def header(benchmark: str, device: str) -> dict:
    return {"benchmark": benchmark, "device": device, "date": dt.date.today().isoformat(),
            "command": " ".join([Path(sys.executable).name] + sys.argv)}


def write(result: dict, out: Path | None, *, smoke: bool, suffix: str) -> Path | None:
    """Write to ``out``, or by default to results/<date>-<device>-<suffix>.json (never for smoke runs)."""
    if out is None and not smoke:
        slug = result["device"].replace(" ", "-").lower()
        out = RESULTS_DIR / f"{result['date']}-{slug}-{suffix}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"wrote {out}")
    return out
