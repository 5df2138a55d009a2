"""The device check's own logic, on CPU: the summary's target verdicts, and the profile and off-path scripts
it runs (bench_peers' providers are tests/test_bench_peers.py's)."""

import csv
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from gpu_summary import reuse_ms_for, summary  # noqa: E402
from models import build_unet, example_call  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def test_summary_judges_the_newest_run_against_the_targets(tmp_path):
    (tmp_path / "stages.txt").write_text("gpu_tests 0 95\nbench_blend 124 70\n")
    (tmp_path / "gpu_tests.txt").write_text("12 passed in 80.1s\n")
    old, new = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"
    write_csv(tmp_path / "bench_blend.csv", [
        {"date": old, "provider": "triton", "MB": "64", "% copy": "10"},  # an older run: ignored
        {"date": new, "provider": "triton", "MB": "64", "% copy": "93", "% same-size copy": "97"},
        {"date": new, "provider": "triton", "MB": "1", "% copy": "40", "% same-size copy": "60"},  # under 8 MB
        {"date": new, "provider": "device copy", "MB": "64", "% copy": "96", "% same-size copy": "100"},
        {"date": new, "provider": "torch eager", "MB": "64", "% copy": "50"},
        {"date": new, "provider": "triton arena, one launch", "MB": "300", "% copy": "75"},
        {"date": new, "provider": "triton BLOCK=1024 warps=4", "MB": "8", "% copy": "85"},
        {"date": new, "provider": "triton BLOCK=1024 warps=4", "MB": "128", "% copy": "95"},
        {"date": new, "provider": "triton BLOCK=4096 warps=8", "MB": "8", "% copy": "91"},
        {"date": new, "provider": "triton BLOCK=4096 warps=8", "MB": "128", "% copy": "92"},
    ])
    write_csv(tmp_path / "bench_peers.csv", [
        {"date": new, "provider": "eager", "loop_ms": "1000", "vs_eager": "1", "vs_compiled": "0.6",
         "measured_over_model": "", "first_loop_s": "2"},
        # Written before the compiled baseline existed: its speedup against it is computed from loop times.
        {"date": new, "provider": "frdiff-m2", "loop_ms": "380", "vs_eager": "2.63", "vs_compiled": "",
         "measured_over_model": "1.04", "first_loop_s": "75", "runtime_host_ms": "12.5", "keyframe_ms": "7.3",
         "reuse_ms": "3.4"},
        # conv_layout="inductor" (a PEER_PROVIDERS choice): reported against the same stock, no target.
        {"date": new, "provider": "frdiff-m2-lo", "loop_ms": "316.7", "keyframe_ms": "7.5", "reuse_ms": "2.1"},
        {"date": new, "provider": "compiled", "loop_ms": "570", "vs_eager": "1.75", "vs_compiled": "1",
         "measured_over_model": "", "first_loop_s": "90"},
        # The faster compiled stock provider is the baseline the target names.
        {"date": new, "provider": "compiled-static", "loop_ms": "500", "measured_over_model": "", "first_loop_s": "80"},
        # Stock compiled with layout optimization off, as frdiff's graphs are: faster here, so it is the baseline.
        {"date": new, "provider": "compiled-static-nchw", "loop_ms": "480", "first_loop_s": "70"},
        # On the channels_last copy of the UNet (a PEER_PROVIDERS choice): the fastest stock here, so the baseline.
        {"date": new, "provider": "compiled-static-cl", "loop_ms": "475", "first_loop_s": "70"},
    ])
    write_csv(tmp_path / "bench_layouts.csv", [
        {"date": new, "provider": "frdiff-m2-cl", "loop_ms": "300", "keyframe_ms": "7.1", "reuse_ms": "2.2"},
        {"date": new, "provider": "compiled-static-cl", "loop_ms": "360"},
        {"date": new, "provider": "frdiff-m2", "loop_ms": "330", "keyframe_ms": "7.3", "reuse_ms": "3.4"},
    ])
    write_csv(tmp_path / "bench_quant.csv", [  # every provider on the torchao-quantized UNet
        {"date": new, "provider": "compiled-static", "quantize": "float8-dynamic", "loop_ms": "300"},
        {"date": new, "provider": "frdiff-m2", "quantize": "float8-dynamic", "loop_ms": "200", "keyframe_ms": "5.2",
         "reuse_ms": "2.5"},
    ])
    write_csv(tmp_path / "bench_compile.csv", [
        {"date": new, "variant": "default", "phase": "cold", "compile_s": "72.5", "triton_binaries": "140"},
        {"date": new, "variant": "default", "phase": "warm", "compile_s": "9.1", "triton_binaries": "140"},
        {"date": new, "variant": "default", "phase": "portable", "compile_s": "12.0", "triton_binaries": "0",
         "fx_hits": "2"},
        {"date": new, "variant": "shared-names", "phase": "cold", "compile_s": "58", "triton_binaries": "101"},
        {"date": new, "variant": "background", "phase": "cold", "compile_s": "50", "triton_binaries": "259",
         "background_compiles": "1"},
        {"date": new, "variant": "background", "phase": "warm", "compile_s": "9", "triton_binaries": "259",
         "background_compiles": "0"},
        {"date": new, "variant": "parts3", "phase": "cold", "compile_s": "41", "triton_binaries": "300",
         "background_compiles": "3"},
        {"date": new, "variant": "parts2", "phase": "cold", "compile_s": "70", "triton_binaries": "290",
         "background_compiles": "1"},
    ])
    write_csv(tmp_path / "bench_methods.csv", [
        {"date": new, "provider": "eager", "loop_ms": "1000"},
        {"date": new, "provider": "frdiff-m2-nocg", "loop_ms": "400"},
        {"date": new, "provider": "deepcache-compiled", "loop_ms": "500"},
    ])
    verdicts = {row[0]: row for row in summary(tmp_path)}
    assert verdicts["methods: frdiff-m2-nocg vs eager"][1:] == ("2.5", "", "-")
    assert verdicts["methods: deepcache-compiled vs eager"][1:] == ("2", "", "-")
    assert verdicts["compile s, default cold (140 Triton binaries)"][1:] == ("72.5", "<= 60", "MISSED")
    assert verdicts["compile s, default warm (140 Triton binaries)"][1:] == ("9.1", "", "-")
    # A fresh cache folder given the cold run's artifacts: no target (the target is a cold compile).
    assert verdicts["compile s, default portable (0 Triton binaries, 2 from the artifacts)"][1:] == ("12", "", "-")
    assert verdicts["compile s, shared-names cold (101 Triton binaries)"][3] == "met"
    assert verdicts["compile s, background cold (259 Triton binaries, worker ok)"][1:] == ("50", "<= 60", "met")
    assert "compile s, background warm (259 Triton binaries, worker FAILED (0 handed over))" in verdicts
    assert verdicts["compile s, parts3 cold (300 Triton binaries, 3 workers ok)"][1:] == ("41", "<= 60", "met")
    assert verdicts["compile s, parts2 cold (290 Triton binaries, 2 workers FAILED (1 handed over))"][3] == "MISSED"
    assert verdicts["stage gpu_tests"][3] == "met" and verdicts["stage bench_blend"][3] == "MISSED"
    assert verdicts["gpu tests"][3] == "met"
    for cut in ("7 passed, 1 failed in 100.0s", "cut short: 8 PASSED, 0 FAILED so far"):
        (tmp_path / "gpu_tests.txt").write_text(cut)
        assert {row[0]: row for row in summary(tmp_path)}["gpu tests"][3] == "MISSED", cut
    (tmp_path / "gpu_tests.txt").write_text("12 passed in 80.1s\n")
    assert verdicts["blend >= 8 MB, worst % of copy BW"][1:] == ("93", ">= 90", "met")
    assert verdicts["blend >= 8 MB, worst % of same-size copy"][1:] == ("97", "", "-")
    assert verdicts["copy >= 8 MB, worst % of the 256 MB copy"][1:] == ("96", "", "-")
    assert verdicts["arena launch, % of copy BW"][3] == "MISSED"
    assert verdicts["blend launch config, best worst-case % copy"][1:3] == ("91 (BLOCK=4096 warps=8)", "default 85")
    assert verdicts["frdiff-m2 vs eager"][3] == "met"
    assert verdicts["frdiff-m2 vs best compiled stock"][1:] == ("1.25", ">= 1.6", "MISSED")
    assert verdicts["layouts: frdiff-m2-cl vs best compiled stock"][1:] == ("1.2", "", "-")
    assert verdicts["layouts: frdiff-m2 vs best compiled stock"][1:] == ("1.09", "", "-")
    assert verdicts["layouts: frdiff-m2-cl keyframe / reuse ms"][1] == "7.1 / 2.2"
    assert verdicts["layouts: frdiff-m2 keyframe / reuse ms"][1] == "7.3 / 3.4"
    assert not any(k.startswith("layouts: frdiff-m3-cl") for k in verdicts)  # not measured (no eager either)
    assert verdicts["quant: frdiff-m2 vs best compiled stock"][1:] == ("1.5", "", "-")  # its own stock, quantized
    assert verdicts["quant (float8-dynamic): frdiff-m2 keyframe / reuse ms"][1] == "5.2 / 2.5"
    assert verdicts["frdiff-m2 measured / cost model"][3] == "met"
    assert verdicts["frdiff-m2 runtime host ms per loop"][1:] == ("12.5", "", "-")
    assert verdicts["frdiff-m2 keyframe / reuse ms"][1] == "7.3 / 3.4"
    assert verdicts["frdiff-m2-lo keyframe / reuse ms"][1] == "7.5 / 2.1"
    assert verdicts["frdiff-m2-lo vs best compiled stock"][1:] == ("1.5", "", "-")
    assert "frdiff-m2-lo vs eager" not in verdicts  # only the targets' providers are judged
    assert verdicts["frdiff-m2 first loop s (compile)"][3] == "MISSED"
    assert verdicts["frdiff-m3 vs eager"][1:] == ("missing", ">= 3", "-")


def test_summary_says_what_reuse_call_the_m2_target_takes(tmp_path):
    """The H200 run of b491c71: keyframe calls, scheduler steps and the measured/model ratio as measured, 1.6x
    compiled stock (381 ms) is a loop of 238 ms, which a reuse call of 1.86 ms (3.40 measured) would give."""
    row = {"date": "2026-11-28T14:26:00Z", "provider": "frdiff-m2", "loop_ms": "261.35", "model_ms": "243.67",
           "measured_over_model": "1.0726", "keyframe_ms": "7.287", "reuse_ms": "3.4006",
           "note": "25/14/11 full/reuse/skip; compile 97 s"}
    stock = {"date": row["date"], "provider": "compiled-static", "loop_ms": "381.08"}
    write_csv(tmp_path / "bench_peers.csv", [row, stock])
    verdicts = {r[0]: r for r in summary(tmp_path)}
    assert verdicts["frdiff-m2 reuse ms that 1.6x compiled stock takes"][1:] == ("1.86", "measured 3.4", "-")
    # With the reuse call at that time, the model's loop meets the target exactly.
    needed = reuse_ms_for(row, 381.08, 1.6)
    model = 243.67 - 14 * 3.4006 + 14 * needed
    assert abs(381.08 / (model * 1.0726) - 1.6) < 1e-9
    # Keyframe calls that alone take the loop past the target: no reuse call can make it.
    write_csv(tmp_path / "bench_peers.csv", [{**row, "model_ms": "400"}, stock])
    verdicts = {r[0]: r for r in summary(tmp_path)}
    assert verdicts["frdiff-m2 reuse ms that 1.6x compiled stock takes"][1] == "none"
    assert reuse_ms_for({**row, "note": ""}, 381.08, 1.6) is None  # no call counts, no answer
    # bench_offpath's rows beside them: the one-stream time and each other case's speedup over it.
    write_csv(tmp_path / "bench_offpath.csv", [
        {"date": row["date"], "mode": "one stream", "convolutions": "22", "us": "1900", "vs one stream": "1"},
        {"date": row["date"], "mode": "2 streams", "convolutions": "22", "us": "1200", "vs one stream": "1.58"},
        {"date": row["date"], "mode": "weight concat (per call, if not laid out once)", "convolutions": "22",
         "us": "80", "vs one stream": ""},
    ])
    verdicts = {r[0]: r for r in summary(tmp_path)}
    assert verdicts["offpath: 22 conv2s on one stream, ms"][1] == "1.9"
    assert verdicts["offpath: 2 streams vs one stream"][1:] == ("1.58", "", "-")
    assert not any("weight concat" in k for k in verdicts)


def test_profile_graphs_lists_each_graphs_work_and_the_summary_reads_both_cache_points(tmp_path):
    out = tmp_path / "profile_graphs.csv"
    for cache_point in ("features", "deep"):  # on CPU: aten ops by self time instead of kernels
        result = subprocess.run(
            [sys.executable, str(BENCH / "profile_graphs.py"), "--small", "--latent", "8", "--calls", "2",
             "--cache-point", cache_point, "--csv", str(out)],
            capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with out.open() as f:
        rows = list(csv.DictReader(f))
    launches = {(r["cache_point"], r["graph"]): float(r["launches_per_call"]) for r in rows}
    assert launches[("deep", "reuse")] < launches[("features", "reuse")] < launches[("features", "keyframe")]
    for key in launches:
        shares = [float(r["share"]) for r in rows if (r["cache_point"], r["graph"]) == key]
        assert abs(sum(shares) - 1) < 1e-6 and shares == sorted(shares, reverse=True), key
    # The convolutions by shape: the keyframe graph runs the UNet's, FLOP for FLOP; the reuse graph fewer.
    with (tmp_path / "profile_convs.csv").open() as f:
        convs = [r for r in csv.DictReader(f) if r["cache_point"] == "features"]
    gflop = {g: sum(float(r["gflop"]) * float(r["launches"]) for r in convs if r["graph"] == g)
             for g in ("keyframe", "reuse")}
    unet = build_unet("small", 8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(**example_call(unet, 2, 8, "cpu", torch.float32), timestep=torch.tensor(500))
    stock = counter.get_flop_counts()["Global"][torch.ops.aten.convolution] / 1e9
    assert abs(gflop["keyframe"] - stock) < 1e-6 * stock and 0 < gflop["reuse"] < stock, (gflop, stock)
    assert all(float(r["tflops"]) > 0 for r in convs), convs
    built = {r["cache_point"]: (float(r["export_s"]), float(r["compile_s"])) for r in rows}
    assert all(export > 0 and compile_s == 0 for export, compile_s in built.values()), built  # eager graphs on CPU
    lines = {row[0]: row for row in summary(tmp_path)}
    for cache_point in ("features", "deep"):
        for graph in ("keyframe", "reuse"):
            assert lines[f"profile: {cache_point} {graph} call"][2].startswith("longest: aten::"), lines
            assert lines[f"profile: {cache_point} {graph} convolutions"][2].startswith("lowest: "), lines
        assert lines[f"profile: {cache_point} export / compile s"][1].endswith(" / 0"), lines
    # Run after bench_peers (gpu_check's order), the features graphs were compiled there: the line says so.
    (tmp_path / "stages.txt").write_text("bench_peers 0 200\nprofile_graphs 0 40\nprofile_deep 0 90\n")
    lines = {row[0]: row for row in summary(tmp_path)}
    assert "profile: features export / compile s (after bench_peers: warm caches)" in lines, lines
    assert "profile: deep export / compile s" in lines, lines


def test_offpath_streams_share_the_convolutions_out_evenly():
    """bench_offpath's K-stream case: every convolution on exactly one stream, the streams' FLOPs within the
    largest convolution of one another (so a measured gain is the streams', not an uneven split's)."""
    from bench_offpath import balanced

    flops = [3.8, 3.8, 3.8, 3.8, 3.8, 3.8, 3.8, 0.9, 0.9, 2.4, 2.4, 1.2, 0.6, 0.6, 0.3]
    for k in (1, 2, 3, 4, 20):
        groups = balanced(flops, k)
        assert sorted(i for g in groups for i in g) == list(range(len(flops))), k
        assert len(groups) == min(k, len(flops))
        loads = [sum(flops[i] for i in g) for g in groups]
        assert max(loads) - min(loads) <= max(flops), (k, loads)
