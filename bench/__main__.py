"""``python -m bench [SECTION ...]``: run the benchmark sections and write bench/results.{json,md}.

Each new figure is printed with its ratio to the same figure of the committed reference run
(``bench/reference/results.json``, with the machine it ran on and its load), so a reader sees at once what moved.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from bench.core import Figure, load_average, machine

# Section name -> module. Order: cheapest first, so a partial run still reports something.
SECTIONS = {
    "program": "bench.program",
    "pipeline": "bench.pipeline_cost",
    "edge_model": "bench.edge_model",
    "broker": "bench.broker",
    "bridge": "bench.bridge",
    "http": "bench.http_bridge",
    "config_push": "bench.config_push",
    "fanout": "bench.fanout_cost",
    "connections": "bench.connections",
    "attacks": "bench.attacks",
}
HERE = Path(__file__).parent
REFERENCE = HERE / "reference" / "results.json"


def reference_values(path: Path = REFERENCE) -> dict[tuple[str, str], float]:
    """(section, figure name) -> value of the reference run; empty when there is none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {(f["section"], f["name"]): float(f["value"]) for f in data.get("figures", [])
            if isinstance(f.get("value"), int | float) and not isinstance(f.get("value"), bool)}


def vs_reference(f: Figure, ref: dict[tuple[str, str], float]) -> float | None:
    """This figure divided by the reference's same figure (None when either is missing or the reference is 0)."""
    base = ref.get((f.section, f.name))
    if f.value is None or not base:
        return None
    return round(float(f.value) / base, 2)


def _ratio_text(r: float | None) -> str:
    return "—" if r is None else f"{r:.2f}×"


def render_markdown(figures: list[Figure], info: dict, elapsed: float,
                    ref: dict[tuple[str, str], float] | None = None) -> str:
    loads = ", ".join(f"{name} {'/'.join(str(x) for x in la)}" for name, la in info.get("load_after", {}).items())
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {info['cores']} cores ({info.get('cpu_model', '?')}), {info.get('memory_gib', '?')} GiB, "
        f"Python {info['python']}, {info['platform']}. Whole run: {elapsed:.0f} s. Reproduce all: `make bench`.",
        f"Load average (1/5/15 min) at the start: {'/'.join(str(x) for x in info.get('load_at_start', []))}; "
        f"after each section: {loads or '—'}. A load above the core count means other work shared the cores.",
        "",
        "| section | figure | value | unit | vs reference | reproduce | note |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for f in figures:
        value = "—" if f.value is None else (f"{f.value:,.2f}" if isinstance(f.value, float) else f"{f.value:,}")
        lines.append(f"| {f.section} | {f.name} | {value} | {f.unit} | {_ratio_text(vs_reference(f, ref or {}))} "
                     f"| `{f.command}` | {f.note} |")
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
    info["load_after"] = {}
    ref = reference_values()
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
        info["load_after"][name] = load_average()
        for f in got:
            print(f"[bench]   {f.name}: {f.value} {f.unit} ({_ratio_text(vs_reference(f, ref))} the reference)",
                  flush=True)
        print(f"[bench] {name} done in {time.monotonic() - start:.1f} s", flush=True)
    shared = sys.modules.get("bench.local")
    if shared is not None:
        # The emulators the sections shared; a failed section's logs are kept.
        shared.stop_all(keep_workdir=bool(failures))
    elapsed = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"machine": info, "elapsed_s": round(elapsed, 1),
         "figures": [{**f.to_json(), "vs_reference": vs_reference(f, ref)} for f in figures],
         "failures": failures}, indent=2) + "\n")
    (args.out / "results.md").write_text(render_markdown(figures, info, elapsed, ref))
    print(f"[bench] wrote {args.out / 'results.json'} and {args.out / 'results.md'} in {elapsed:.0f} s")
    if failures and shared is not None and shared._workdir is not None:
        print(f"[bench] logs of the failed sections: {shared._workdir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
