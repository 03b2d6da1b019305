"""Tables from the benchmark results, and README.md's Performance section.

    python benchmarks/report.py                        # the latest training-throughput results, as markdown
    python benchmarks/report.py FILE.json              # that file's table
    python benchmarks/report.py --merge A.json B.json  # join runs of bench_train.py made in several device
                                                       # calls (later files win a (model, system) clash) into
                                                       # benchmarks/results/<date>-<device>.json (or --out)
    python benchmarks/report.py --readme               # rewrite README.md between the perf markers

The README section is generated, never edited by hand: the latest non-smoke `bench_train.py` results
file (by date in the file name) and the latest CPU suite file (`*-suite.json`, pytest-benchmark's JSON),
each with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import _results

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
GIB = 1 << 30


# ----------------------------------------------------------------------------------------------------
# training throughput (bench_train.py)


def _fmt(x, spec: str, default: str = "-") -> str:
    return default if x is None else format(x, spec)


def _ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def table(result: dict) -> str:
    """One markdown row per (model, system): throughput, memory, MFU, and the ratios to `hf`."""
    lines = ["| model | system | tokens/s | response tokens/s | step (s) | peak memory (GiB) | MFU | "
             "tokens/s vs hf | memory vs hf | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    baseline = {r["model"]: r for r in result["rows"] if r["system"] == "hf" and r.get("status") == "ok"}
    for r in result["rows"]:
        hf = baseline.get(r["model"], {})
        ok = r.get("status") == "ok"
        note = "" if ok else (r.get("reason") or r.get("error") or r.get("status", "")).replace("|", "/")
        if ok and r.get("handicapped"):  # a native piece fell back on the GPU: the number is not fastsft's best
            note = ("HANDICAPPED, fell back: " + "; ".join(r["handicapped"])).replace("|", "/")
        if len(note) > 160:
            note = note[:157] + "..."
        mem = r.get("peak_memory_bytes") if ok else None
        lines.append(" | ".join([
            "", r["model"], r["system"],
            _fmt(r.get("tokens_per_s") if ok else None, ",.0f"),
            _fmt(r.get("response_tokens_per_s") if ok else None, ",.0f"),
            _fmt(r.get("step_time_s") if ok else None, ".3f"),
            _fmt(None if mem is None else mem / GIB, ".2f"),
            _fmt(r.get("mfu") if ok else None, ".1%"),
            _fmt(_ratio(r.get("tokens_per_s"), hf.get("tokens_per_s")) if ok else None, ".2f", "-") + ("x" if ok and hf else ""),
            _fmt(_ratio(mem, hf.get("peak_memory_bytes")) if ok else None, ".0%"),
            note, ""]).strip())
    return "\n".join(lines)


def markdown(result: dict, heading: str = "#") -> str:
    """The table with what it measured: device, matmul rate, workload, command."""
    w = result["workload"]
    mm = result.get("matmul", {})
    parts = result.get("parts") or [{"command": result["command"], "date": result["date"]}]
    commands = "\n".join(f"    {p['command']}" for p in parts)
    smoke = " (SMOKE RUN: toy shapes on the CPU; the numbers mean nothing)" if result.get("smoke") else ""
    rates = sorted({p["matmul_tflops"] for p in parts if "matmul_tflops" in p})
    rate = (f"{result['matmul_tflops']:.3g} TFLOP/s" if len(rates) < 2 else
            "each run's own (" + ", ".join(f"{r:.3g}" for r in rates) + " TFLOP/s)")
    about = textwrap.fill(
        f"QLoRA (NF4 base, LoRA r={w['lora_r']} on all linear layers), gradient checkpointing, max_seq_len "
        f"{w['max_seq_len']}, records drawn from the GSM8K + CodeAlpaca token-length distribution (mean "
        f"{w['mean_record_tokens']:.0f} tokens); per optimizer step {w['grad_accum']} micro-batches of "
        f"{w['rows_per_micro_batch']} packed rows, or {w.get('padded_grad_accum', w['grad_accum'])} of "
        f"{w['records_per_micro_batch']} padded records; {w['timed_steps']} timed steps after "
        f"{w['warmup_steps']} warm-up steps. MFU against the {mm.get('dtype', 'bf16')} matmul rate measured "
        f"in the same run: {rate}. FLOP accounting: the "
        f"`benchmarks/bench_train.py` docstring (forward 2N + input gradient 2N per token, recompute under "
        f"checkpointing, causal attention, LM head on response tokens only, no weight gradients for frozen "
        f"weights). Peak memory counts from the first training step. Made by:", width=100)
    return f"""{heading} Training throughput: {result['device']}, {result['date']}{smoke}

{about}

{commands}

{table(result)}
"""


def is_throughput(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("benchmark") == "train_throughput" and not d.get("smoke") else None


def latest(pattern_ok, results_dir: Path = _results.RESULTS_DIR) -> tuple[Path, dict] | tuple[None, None]:
    """The newest results file (by the date its name starts with, then name) that pattern_ok accepts."""
    for path in sorted(results_dir.glob("*.json"), reverse=True):
        d = pattern_ok(path)
        if d is not None:
            return path, d
    return None, None


def merge(paths: list[Path]) -> dict:
    """Rows of several runs of one device; a later file's row replaces an earlier one for the same
    (model, system). Each row keeps the matmul rate its MFU was computed with."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    devices = {r["device"] for r in runs}
    if len(devices) != 1:
        raise SystemExit(f"cannot merge results of different devices: {sorted(devices)}")
    merged = {**runs[-1], "rows": [], "parts": []}
    models, systems = [], []
    index: dict[tuple, int] = {}
    for r in runs:
        merged["parts"].append({"command": r["command"], "date": r["date"], "matmul_tflops": r["matmul_tflops"]})
        for m in r["workload"]["models"]:
            if m not in models:
                models.append(m)
        for name in r["workload"].get("systems", []):
            if name not in systems:
                systems.append(name)
        for row in r["rows"]:
            key = (row["model"], row["system"])
            if key in index:
                merged["rows"][index[key]] = row
            else:
                index[key] = len(merged["rows"])
                merged["rows"].append(row)
    merged["workload"] = {**runs[-1]["workload"], "models": models, "systems": systems}
    merged["matmul_tflops"] = min(r["matmul_tflops"] for r in runs)
    merged["date"] = max(r["date"] for r in runs)
    return merged


# ----------------------------------------------------------------------------------------------------
# the CPU suite (pytest-benchmark JSON)


def is_suite(path: Path) -> dict | None:
    if not path.name.endswith("-suite.json"):
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and "benchmarks" in d else None


def suite_table(suite: dict) -> str:
    """One row per benchmark: the seconds it records (the median round; packing: the best round, as its
    own summary prints) and the throughput that makes."""
    lines = ["| suite | provider | seconds | throughput | note |", "| --- | --- | ---: | ---: | --- |"]
    for b in suite["benchmarks"]:
        info = b.get("extra_info", {})
        module = b["fullname"].split("::")[0].rsplit("/", 1)[-1].removeprefix("bench_").removesuffix(".py")
        seconds = info.get("seconds", b["stats"]["median"])
        rate = info.get("throughput")
        shown = f"{rate:,.0f} {info.get('unit', '/s')}" if rate else "-"
        lines.append(f"| {module} | {b['name'].removeprefix('test_')} | {seconds:.3f} | {shown} | "
                     f"{info.get('note', '')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# README


def readme_section(results_dir: Path = _results.RESULTS_DIR) -> str:
    def rel(p: Path) -> str:
        p = p.resolve()
        return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else str(p)

    out = ["<!-- generated by `python benchmarks/report.py --readme` from benchmarks/results/; "
           "do not edit by hand -->", ""]
    path, result = latest(is_throughput, results_dir)
    if result is None:
        out += ["No GPU run of the training-throughput harness is committed yet. It runs every system",
                "(fastsft, its ablations, transformers + peft + bitsandbytes, Liger, Unsloth) on the",
                "Llama-3.1-8B, Llama-3.2-1B and Qwen2.5-0.5B shapes:", "",
                "```bash", "python benchmarks/bench_train.py", "```", "",
                "(`benchmarks/README.md` says how to run it on the GPU machine.)", ""]
    else:
        out += [markdown(result, heading="###").strip(), "", f"From `{rel(path)}`.", ""]
    path, suite = latest(is_suite, results_dir)
    if suite is not None:
        info = suite.get("machine_info", {})
        cpu = info.get("cpu", {}).get("brand_raw", info.get("processor", "CPU"))
        out += [f"### CPU suite: {cpu}, {suite.get('datetime', '')[:10]}", "",
                "Packing, the data pipeline, the loss and one train step of a tiny model (no GPU):", "",
                "```bash", suite.get("command", "python -m pytest benchmarks --benchmark-only"), "```",
                "", suite_table(suite), "", f"From `{rel(path)}`.", ""]
    return "\n".join(out).rstrip() + "\n"


def write_readme(readme: Path = README, results_dir: Path = _results.RESULTS_DIR) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{readme_section(results_dir)}{END}{tail}")
    print(f"rewrote the Performance section of {readme}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--merge", action="store_true", help="merge FILES into one results file")
    p.add_argument("--out", type=Path, default=None, help="with --merge: where (default results/<date>-<device>.json)")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's Performance section")
    p.add_argument("--results-dir", type=Path, default=_results.RESULTS_DIR)
    p.add_argument("--readme-path", type=Path, default=README)
    args = p.parse_args(argv)
    if args.merge:
        if len(args.files) < 1:
            p.error("--merge needs result files")
        result = merge(args.files)
        out = args.out or args.results_dir / f"{result['date']}-{_results.slug(result['device'])}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {out} and {out.with_suffix('.md')}")
        print(table(result))
        return 0
    if args.readme:
        write_readme(args.readme_path, args.results_dir)
        return 0
    if args.files:
        print(markdown(json.loads(args.files[0].read_text())))
        return 0
    path, result = latest(is_throughput, args.results_dir)
    if result is None:
        print(f"no training-throughput results in {args.results_dir}")
        return 1
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
