"""``python -m bench [SECTION ...]``: run the benchmark sections and write bench/results.{json,md}."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.core import Figure, machine

# Section name -> module. Order: cheapest first, so a partial run still reports something.
SECTIONS = {
    "program": "bench.program",
    "pipeline": "bench.pipeline_cost",
    "edge_model": "bench.edge_model",
    "broker": "bench.broker",
    "bridge": "bench.bridge",
    "http": "bench.http_bridge",
    "config_push": "bench.config_push",
    "connections": "bench.connections",
    "attacks": "bench.attacks",
}
HERE = Path(__file__).parent


def render_markdown(figures: list[Figure], info: dict, elapsed: float) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {info['cores']} cores, Python {info['python']}, {info['platform']}. "
        f"Whole run: {elapsed:.0f} s. Reproduce all: `make bench`.",
        "",
        "| section | figure | value | unit | reproduce | note |",
        "|---|---|---:|---|---|---|",
    ]
    for f in figures:
        value = "—" if f.value is None else (f"{f.value:,.2f}" if isinstance(f.value, float) else f"{f.value:,}")
        lines.append(f"| {f.section} | {f.name} | {value} | {f.unit} | `{f.command}` | {f.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("sections", nargs="*", metavar="SECTION",
                   help=f"sections to run (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=HERE, help="folder for results.json and results.md")
    args = p.parse_args(argv)
    chosen = args.sections or list(SECTIONS)
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    info = machine()
    figures: list[Figure] = []
    failures: dict[str, str] = {}
    t0 = time.monotonic()
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        start = time.monotonic()
        try:
            module = importlib.import_module(SECTIONS[name])
        except ModuleNotFoundError as exc:
            failures[name] = f"not available: {exc}"
            print(f"[bench] {name}: skipped ({exc})", flush=True)
            continue
        try:
            got = module.run()
        except Exception as exc:  # noqa: BLE001 - report and go on with the other sections
            failures[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        figures.extend(got)
        for f in got:
            print(f"[bench]   {f.name}: {f.value} {f.unit}", flush=True)
        print(f"[bench] {name} done in {time.monotonic() - start:.1f} s", flush=True)
    shared = sys.modules.get("bench.local")
    if shared is not None:
        # The emulators the sections shared; a failed section's logs are kept.
        shared.stop_all(keep_workdir=bool(failures))
    elapsed = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": info, "elapsed_s": round(elapsed, 1), "figures": [f.to_json() for f in figures],
         "failures": failures}, indent=2) + "\n")
    (args.out / "results.md").write_text(render_markdown(figures, info, elapsed))
    print(f"[bench] wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {elapsed:.0f} s")
    if failures and shared is not None and shared._workdir is not None:
        print(f"[bench] logs of the failed sections: {shared._workdir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
