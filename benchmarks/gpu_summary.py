"""The short table gpu_check.sh prints last: each stage's exit status and the numbers the targets name.

Usage: python benchmarks/gpu_summary.py OUT_DIR [--dry-run]
Reads OUT_DIR/stages.txt, gpu_tests.txt, bench_blend.csv, bench_peers.csv and, when present,
bench_peers_sdxl.csv, bench_compile.csv, bench_methods.csv, bench_deep.csv, bench_layouts.csv, bench_quant.csv,
bench_offpath.csv and profile_graphs.csv (the newest run in each; in profile_graphs.csv, of each cache point), and
prints one line per target: measured value, target, and whether it is met. Missing files or rows print as
"missing" rather than failing, so a partial run still reports what it has.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

# The targets for an H100.
BLEND_TARGET = 90.0  # % of copy bandwidth, tensors >= 8 MB
ARENA_TARGET = 80.0
# (provider, baseline) -> speedup target; "compiled" is the faster of the compiled stock providers measured.
PEER_TARGETS = {("frdiff-m2", "eager"): 2.5, ("frdiff-m3", "eager"): 3.0, ("frdiff-m2", "compiled"): 1.6}
COMPILED_STOCK = ("compiled-static", "compiled-static-nchw", "compiled-static-cl", "compiled")
MODEL_TOLERANCE = 0.10
COMPILE_TARGET_S = 60.0
DEFAULT_CONFIG = "BLOCK=1024 warps=4"  # the blend kernel's launch configuration (kernels/blend.py)


def newest(path: Path, per: str | None = None) -> list[dict[str, str]]:
    """The rows of the newest run in `path`, or of the newest run of each value of column `per` (a stage
    whose runs are processes of their own, one per value)."""
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    last: dict[str | None, str] = {}
    for r in rows:
        key = r[per] if per else None
        last[key] = max(last.get(key, ""), r["date"])
    return [r for r in rows if r["date"] == last[r[per] if per else None]]


def number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def baselines(loop: dict[str, float | None]) -> dict[str, float | None]:
    """Loop ms of eager and of the faster compiled stock provider measured, by provider name."""
    stock = [loop[n] for n in COMPILED_STOCK if loop.get(n)]
    return {"eager": loop.get("eager"), "compiled": min(stock) if stock else None}


def reuse_ms_for(row: dict[str, str], base_ms: float | None, speedup: float) -> float | None:
    """The reuse call, in ms, at which `row`'s loop would be `speedup` times as fast as `base_ms`, with its
    keyframe calls, other steps and measured-over-model ratio as measured; None without those numbers.

    The loop is modelled as bench_peers models it (calls times per-call times, plus scheduler and skip steps)
    and scaled by the run's own measured/model ratio, so the host work per step is kept, not assumed away.
    """
    counts = re.search(r"(\d+)/(\d+)/(\d+) full/reuse/skip", row.get("note") or "")
    model, ratio = number(row.get("model_ms")), number(row.get("measured_over_model"))
    reuse = number(row.get("reuse_ms"))
    if not counts or int(counts.group(2)) == 0 or None in (model, ratio, reuse) or not base_ms:
        return None
    calls = int(counts.group(2))
    return (base_ms / speedup / ratio - (model - calls * reuse)) / calls


def line(what: str, value: float | None, target: str, met: bool | None) -> tuple[str, str, str, str]:
    shown = "missing" if value is None else f"{value:.3g}"
    verdict = "-" if met is None else ("met" if met else "MISSED")
    return what, shown, target, verdict


def summary(out: Path) -> list[tuple[str, str, str, str]]:
    lines = []
    stages = (out / "stages.txt").read_text().split("\n") if (out / "stages.txt").exists() else []
    for stage in filter(None, stages):
        name, rc, secs = (stage.split() + ["", ""])[:3]
        lines.append((f"stage {name}", f"exit {rc}", f"{secs} s", "met" if rc == "0" else "MISSED"))
    tests = (out / "gpu_tests.txt").read_text().strip() if (out / "gpu_tests.txt").exists() else "missing"
    if "cut short" in tests or " failed" in tests or " error" in tests:
        verdict = "MISSED"
    else:
        verdict = "met" if "passed" in tests else "-"
    lines.append(("gpu tests", tests or "missing", "all pass", verdict))

    blend = newest(out / "bench_blend.csv")
    large = [number(r["% copy"]) for r in blend if r["provider"] == "triton" and (number(r["MB"]) or 0) >= 8]
    worst = min(large) if large else None
    lines.append(line("blend >= 8 MB, worst % of copy BW", worst, f">= {BLEND_TARGET:g}",
                      None if worst is None else worst >= BLEND_TARGET))
    # No target: against a copy of the same size, and that copy against the 256 MB one (newer runs only),
    # to tell a size's shortfall that is the kernel's from one any kernel of that size has.
    for provider, column, what in (("triton", "% same-size copy", "blend >= 8 MB, worst % of same-size copy"),
                                   ("device copy", "% copy", "copy >= 8 MB, worst % of the 256 MB copy")):
        values = [number(r.get(column)) for r in blend if r["provider"] == provider and (number(r["MB"]) or 0) >= 8]
        values = [v for v in values if v is not None]
        if values:
            lines.append(line(what, min(values), "", None))
    # bench_blend's launch-configuration sweep (no target): the configuration whose worst size does best.
    configs: dict[str, list[float]] = {}
    for r in blend:
        if r["provider"].startswith("triton BLOCK="):
            configs.setdefault(r["provider"].removeprefix("triton "), []).append(number(r["% copy"]) or 0.0)
    if configs:
        best = max(configs, key=lambda k: min(configs[k]))
        lines.append(("blend launch config, best worst-case % copy", f"{min(configs[best]):.3g} ({best})",
                      f"default {min(configs.get(DEFAULT_CONFIG, [0.0])):.3g}", "-"))
    arena = [number(r["% copy"]) for r in blend if r["provider"].startswith("triton arena")]
    worst_arena = min(arena) if arena else None
    lines.append(line("arena launch, % of copy BW", worst_arena, f">= {ARENA_TARGET:g}",
                      None if worst_arena is None else worst_arena >= ARENA_TARGET))

    peers = {r["provider"]: r for r in newest(out / "bench_peers.csv")}
    for name, row in peers.items():
        lines.append(line(f"{name} loop ms", number(row.get("loop_ms")), "", None))
    loop = {name: number(row.get("loop_ms")) for name, row in peers.items()}
    base_ms = baselines(loop)
    for (name, baseline), target in PEER_TARGETS.items():
        # From loop times: bench_peers writes a row before a later baseline (compiled stock) exists.
        base, own = base_ms[baseline], loop.get(name)
        value = base / own if base and own else None
        what = f"{name} vs {'best compiled stock' if baseline == 'compiled' else baseline}"
        lines.append(line(what, value, f">= {target:g}", None if value is None else value >= target))
    # What the M=2 target asks of the reuse call, the rest of this run's loop as measured (no target: the
    # number to set against the measured reuse call when choosing what to work on).
    target = PEER_TARGETS[("frdiff-m2", "compiled")]
    needed = reuse_ms_for(peers.get("frdiff-m2", {}), base_ms["compiled"], target)
    measured = number(peers.get("frdiff-m2", {}).get("reuse_ms"))
    what = f"frdiff-m2 reuse ms that {target:g}x compiled stock takes"
    if needed is not None and needed <= 0:  # the keyframe calls and other steps alone are over the target
        lines.append((what, "none", f"measured {measured:.3g}; out of reach", "-"))
    else:
        lines.append(line(what, needed, "" if measured is None else f"measured {measured:.3g}", None))
    for name in ("frdiff-m2", "frdiff-m3"):
        ratio = number(peers.get(name, {}).get("measured_over_model"))
        lines.append(line(f"{name} measured / cost model", ratio, f"within {MODEL_TOLERANCE:.0%}",
                          None if ratio is None else abs(ratio - 1) <= MODEL_TOLERANCE))
        # What feature reuse adds over the same runtime with a keyframe at every step (no target).
        lines.append(line(f"{name} vs all keyframes", number(peers.get(name, {}).get("vs_all_keyframes")), "", None))
        # The runtime's host work per loop: its loop minus the same loop with the graphs called directly.
        lines.append(line(f"{name} runtime host ms per loop", number(peers.get(name, {}).get("runtime_host_ms")), "",
                          None))
    # Every frdiff provider's per-call times, and the variants' speedups (another conv layout, no CUDA graphs,
    # the UNet channels_last) against the same stock: no target, the numbers that say which configuration to
    # make the default.
    for name, row in peers.items():
        if not name.startswith("frdiff"):
            continue
        lines += call_ms_lines(name, row)
        if name not in ("frdiff-m2", "frdiff-m3") and loop.get(name) and base_ms["compiled"]:
            lines.append(line(f"{name} vs best compiled stock", base_ms["compiled"] / loop[name], "", None))
    # Both graphs' compile time as the runtime counts it, for M=2 (M=3 runs M=2's graphs); older rows have
    # only the first loop's time.
    row = peers.get("frdiff-m2", {})
    compile_s, label = number(row.get("compile_s")), "compile s (both graphs)"
    if compile_s is None:
        compile_s, label = number(row.get("first_loop_s")), "first loop s (compile)"
    lines.append(line(f"frdiff-m2 {label}", compile_s, f"<= {COMPILE_TARGET_S:g}",
                      None if compile_s is None else compile_s <= COMPILE_TARGET_S))

    # Cold and warm compile per inductor setting (optional stage): a fresh machine is the cold case.
    for r in newest(out / "bench_compile.csv"):
        seconds, cold = number(r.get("compile_s")), r.get("phase") == "cold"
        what = f"compile s, {r.get('variant')} {r.get('phase')} ({r.get('triton_binaries') or '?'} Triton binaries"
        if r.get("phase") == "portable":  # graphs served by the loaded artifacts (keyframe parts count apart)
            what += f", {r.get('fx_hits') or 0} from the artifacts"
        # Did every worker hand its graph over (else it was compiled here)? "background" has one (the reuse
        # graph); "partsK" K: the reuse graph and the keyframe graph's parts after the first.
        variant = r.get("variant") or ""
        parts = re.fullmatch(r"parts(\d+)", variant)
        workers = 1 if variant == "background" else int(parts.group(1)) if parts else 0
        if workers:
            done = r.get("background_compiles")
            what += (", worker" if workers == 1 else f", {workers} workers") + (
                " ok" if done == str(workers) else f" FAILED ({done or 0} handed over)")
        what += ")"
        lines.append(line(what, seconds, f"<= {COMPILE_TARGET_S:g}" if cold else "",
                          None if seconds is None or not cold else seconds <= COMPILE_TARGET_S))

    # SDXL (optional stage): reported, no target.
    lines += speedup_lines(out / "bench_peers_sdxl.csv", ("frdiff-m2", "frdiff-m3"), "sdxl")
    # FRDiff and DeepCache both compiled without CUDA graphs (optional stage): reported, no target.
    methods = {r["provider"]: number(r.get("loop_ms")) for r in newest(out / "bench_methods.csv")}
    for name in ("frdiff-m2-nocg", "frdiff-m3-nocg", "frdiff-deep3-nocg", "deepcache-compiled"):
        if methods.get("eager") and methods.get(name):
            lines.append(line(f"methods: {name} vs eager", methods["eager"] / methods[name], "", None))
    # DeepCache's method on frdiff's graphs (optional stage): reported, no target.
    lines += speedup_lines(out / "bench_deep.csv", ("frdiff-deep3", "frdiff-deep2"), "deep:")
    # The UNet converted to channels_last (optional stage), against the NCHW UNet's frdiff in the same run:
    # reported, no target.
    layouts = newest(out / "bench_layouts.csv")
    lines += speedup_lines(out / "bench_layouts.csv", ("frdiff-m2-cl", "frdiff-m3-cl", "frdiff-m2"), "layouts:")
    for r in layouts:
        if r["provider"] in ("frdiff-m2-cl", "frdiff-m2"):
            lines += call_ms_lines(f"layouts: {r['provider']}", r)
    # Every provider on the UNet quantized by torchao (optional stage), against its compiled stock: no target.
    lines += speedup_lines(out / "bench_quant.csv", ("frdiff-m2", "frdiff-m3"), "quant:")
    for r in newest(out / "bench_quant.csv"):
        if r["provider"] == "frdiff-m2":
            lines += call_ms_lines(f"quant ({r.get('quantize')}): frdiff-m2", r)
    ran = [stage.split()[0] for stage in filter(None, stages)]  # in the order they ran
    peers_first = {"bench_peers", "profile_graphs"} <= set(ran) and ran.index("bench_peers") < ran.index(
        "profile_graphs")
    lines += profile_lines(out / "profile_graphs.csv", peers_first)
    lines += conv_lines(out / "profile_convs.csv")
    # The reuse call's convolutions off the sample's path (optional stage): at once against one after another.
    for r in newest(out / "bench_offpath.csv"):
        if r["mode"] == "one stream":
            us = number(r["us"])
            lines.append(line(f"offpath: {r['convolutions']} conv2s on one stream, ms", us and us / 1e3, "", None))
        elif number(r.get("vs one stream")) is not None:
            lines.append(line(f"offpath: {r['mode']} vs one stream", number(r["vs one stream"]), "", None))
    return lines


def profile_lines(path: Path, peers_first: bool = False) -> list[tuple[str, str, str, str]]:
    """Per graph and cache point (optional stage): device ms and launches per call, and the longest kernel;
    per cache point, the seconds the runtime spent building and compiling the pair (`peers_first`: bench_peers
    had compiled the features graphs in this run, so inductor's caches were warm for them)."""
    graphs: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in newest(path, per="cache_point"):  # each cache point is profiled by a process of its own
        graphs.setdefault((r["cache_point"], r["graph"]), []).append(r)
    lines = []
    for cache_point in dict.fromkeys(cp for cp, _ in graphs):
        row = graphs[(cache_point, "keyframe")][0] if (cache_point, "keyframe") in graphs else {}
        if number(row.get("compile_s")) is not None:  # older rows have no compile columns
            warm = " (after bench_peers: warm caches)" if peers_first and cache_point == "features" else ""
            value = f"{number(row['export_s']):.3g} / {number(row['compile_s']):.3g}"
            lines.append((f"profile: {cache_point} export / compile s{warm}", value,
                          f"reuse graph {number(row['reuse_compile_s']):.3g} s", "-"))
    for (cache_point, graph), rows in graphs.items():
        top = min(rows, key=lambda r: int(r["rank"]))
        value = f"{number(top['profiled_ms']):.3g} ms, {number(top['launches_per_call']):.0f} launches"
        longest = f"longest: {top['kernel'][:48]} ({number(top['share']):.0%})"
        lines.append((f"profile: {cache_point} {graph} call", value, longest, "-"))
    return lines


def conv_lines(path: Path) -> list[tuple[str, str, str, str]]:
    """Per graph and cache point (profile_graphs' convolutions by shape): their time and TFLOP/s per call, and
    the shape with the lowest TFLOP/s, which says whether small convolutions leave the GPU idle."""
    graphs: dict[tuple[str, str], list[dict[str, str]]] = {}
    for r in newest(path, per="cache_point"):
        if number(r.get("tflops")):
            graphs.setdefault((r["cache_point"], r["graph"]), []).append(r)
    lines = []
    for (cache_point, graph), rows in graphs.items():
        us = sum(number(r["us"]) for r in rows)
        gflop = sum(number(r["gflop"]) * number(r["launches"]) for r in rows)
        worst = min(rows, key=lambda r: number(r["tflops"]))
        value = f"{us / 1e3:.3g} ms, {gflop / us * 1e3:.3g} TFLOP/s"
        lowest = f"lowest: {number(worst['tflops']):.3g} TFLOP/s, {worst['conv']} x{number(worst['launches']):.0f}"
        lines.append((f"profile: {cache_point} {graph} convolutions", value, lowest, "-"))
    return lines


def call_ms_lines(what: str, row: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """A frdiff row's keyframe and reuse call times as one line (no target); none where it has no reuse time."""
    if not number(row.get("reuse_ms")):
        return []
    return [(f"{what} keyframe / reuse ms", f"{number(row['keyframe_ms']):.3g} / {number(row['reuse_ms']):.3g}", "",
             "-")]


def speedup_lines(path: Path, names: tuple[str, ...], prefix: str) -> list[tuple[str, str, str, str]]:
    """Speedups of `names` against eager and the best compiled stock in one optional stage's CSV (no target)."""
    loop = {r["provider"]: number(r.get("loop_ms")) for r in newest(path)}
    base_ms, lines = baselines(loop), []
    for name in names:
        for baseline, label in (("eager", "eager"), ("compiled", "best compiled stock")):
            base, own = base_ms[baseline], loop.get(name)
            if base and own:
                lines.append(line(f"{prefix} {name} vs {label}", base / own, "", None))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="label the table as a CPU dry run")
    args = parser.parse_args()
    rows = summary(args.out)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    title = "gpu_check summary" + (" (DRY RUN on CPU: no number here is a GPU measurement)" if args.dry_run else "")
    print(f"\n{title}")
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
