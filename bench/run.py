"""Run the benchmarks, print one table, and write results/bench.json (atomically) with the machine and the date.

    python -m bench.run                          # everything, full sizes (make bench); ~8 min on 2 idle cores
    python -m bench.run --quick --out /tmp/b.json  # tiny sizes: a smoke run in about 20 s
    python -m bench.run --only search captioning   # some of them
    python -m bench.run --load                     # also bench/load_dashboard.py: 20 sessions for 60 s (+1.5 min)

Run it on an idle machine: `machine.load_average_1min_at_start` above the core count means the figures are low.
A benchmark that fails records {"error": ...} and the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.browser import bench_browser
from bench.captioning import bench_captioning
from bench.common import REPO, reference_run, run_sample
from bench.dashboard_pages import bench_dashboard
from bench.evaluation import bench_evaluation
from bench.machine import bench_machine
from bench.search import bench_search
from bench.training import bench_training
from ris_core.files import write_json_atomic
from ris_core.runs import RESULTS_DIR

DEFAULT_OUT = RESULTS_DIR / "bench.json"
BENCHMARKS = ["machine", "captioning", "training", "search", "evaluation", "dashboard", "browser"]


def bench_load(quick: bool = False) -> dict:
    """bench/load_dashboard.py in a subprocess: 20 sessions x 60 s (quick: 3 sessions x 10 s on a small cut)."""
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        out = Path(tmp) / "load.json"
        cmd = [sys.executable, "-m", "bench.load_dashboard", "--json", str(out)]
        if quick:
            cmd += ["--sessions", "3", "--seconds", "10", "--timeout", "120"]
            run, _ = reference_run()
            if run is not None:  # a cold search demo embeds every catalog image: keep the catalog tiny
                cmd += ["--data_dir", str(run_sample(run, Path(tmp) / "data", 8, 16))]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
        if not out.is_file():
            return {"error": f"load test exited {done.returncode}: {done.stderr[-500:]}"}
        summary = json.loads(out.read_text())
    concurrent = summary["concurrent"]
    return {
        "sessions": summary["sessions"], "seconds": summary["seconds"], "passed": summary["passed"],
        "page_loads": concurrent["page_loads"], "p50_seconds": concurrent["p50_seconds"],
        "p95_seconds": concurrent["p95_seconds"], "max_seconds": concurrent["max_seconds"],
        "server_rss_peak_mb": summary["server_rss_peak_mb"], "server_rss_growth_mb": summary["server_rss_growth_mb"],
        "server_rss_second_half_growth_mb": summary["server_rss_second_half_growth_mb"],
        "server_rss_10s_after_close_mb": summary["server_rss_10s_after_close_mb"],
        "captioner_loads": summary["loads_counted_in_server"]["captioner"], "problem_count": summary["problem_count"],
        "checks": summary["checks"], "cold_page_seconds": summary["cold_page_seconds"],
        "per_page": concurrent["pages"],
    }


def run_all(names: list[str], quick: bool) -> dict:
    results: dict[str, dict] = {}
    for name in names:
        print(f"[bench] {name}{' (quick)' if quick else ''}...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            if name == "captioning" and "machine" in results and "matmul_fp32_gflops" in results["machine"]:
                machine = results["machine"]  # the same run's matmul rates: one floor for every figure
                figures = bench_captioning(quick, machine["matmul_fp32_gflops"], machine["matmul_bf16_gflops"])
            else:
                figures = FUNCTIONS[name](quick)
        except Exception as err:  # noqa: BLE001 - one broken benchmark must not lose the others' figures
            figures = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(limit=5)}
        figures["bench_seconds"] = round(time.perf_counter() - start, 1)
        results[name] = figures
    return results


FUNCTIONS = {"machine": bench_machine, "captioning": bench_captioning, "training": bench_training,
             "search": bench_search, "evaluation": bench_evaluation, "dashboard": bench_dashboard,
             "browser": bench_browser, "load": bench_load}


def _flat(figures: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every figure, nested ones included (a page's per-page details excepted)."""
    out = []
    for key, value in figures.items():
        if key in ("traceback", "per_page"):
            continue
        out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]
    return out


def table(results: dict) -> str:
    rows = [(name, key, value) for name, figures in results.items() for key, value in _flat(figures)]
    width = max(len(f"{a}  {b}") for a, b, _ in rows)
    lines = [f"{'benchmark  figure':<{width}}  value", "-" * (width + 30)]
    lines += [f"{f'{a}  {b}':<{width}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, figures not meaningful")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=[*BENCHMARKS, "load"], default=None, help="run only these")
    parser.add_argument("--load", action="store_true", help="also run the 20-session dashboard load test")
    args = parser.parse_args(argv)
    names = args.only or (BENCHMARKS + (["load"] if args.load else []))
    if "machine" not in names:
        names = ["machine", *names]  # every result file says where it was measured
    started = time.perf_counter()
    results = run_all(names, args.quick)
    report = {
        "date": results["machine"].get("date"), "quick": args.quick,
        "machine": results.pop("machine"), "benchmarks": results,
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    print(table({"machine": report["machine"], **results}))
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
