#!/usr/bin/env bash
# The one prepared device check: GPU-marked tests, bench_blend, then bench_peers (the SD 1.5 UNet loop on
# CUDA against eager, compiled stock and DeepCache: what the GPU issue asks of bench_unet), and a short
# summary table printed last.
#
#   benchmarks/gpu_check.sh            on the GPU machine, from the repository root, with the wheels from
#                                      `../shared/gpu/carry-wheels DeepCache==0.1.1 accelerate==1.15.0
#                                      psutil pyyaml peft==0.21.2 torchao==0.18.0` carried in .whl/
#                                      (accelerate: the offload test; peft: the LoRA hotswap test; torchao:
#                                      the quantized-weights test and bench_quant; each skips without it)
#                                      (device tool: carry [".whl"], timeout_s 600, and the command
#                                      `FRDIFF_GIT_REV=<this commit> bash benchmarks/gpu_check.sh`, since
#                                      the device's copy of the checkout may carry a stale .git)
#   benchmarks/gpu_check.sh --dry-run  here, on CPU, in the project's .venv: the same stages on tiny
#                                      configs, so the script's own logic is checked before device time;
#                                      the GPU tests run on CPU too (FRDIFF_EMULATE_GPU=1: CPU inductor,
#                                      CUDA graphs emulated), all but the two that inspect the Triton kernel
#
# Everything goes to $OUT (a temporary folder when unset): gpu_check.log (every stage's output), the CSVs
# bench_blend.csv and bench_peers.csv (bench_unet.csv, bench_compile.csv, bench_methods.csv, bench_deep.csv,
# bench_offpath.csv, profile_graphs.csv and profile_convs.csv when those stages are asked for), gpu_tests.txt
# and stages.txt. Each stage has its own time limit inside one overall deadline (BUDGET_S, 560 s by default, the
# install included); a failing or timed-out stage is reported and the next one still runs. Stages run in this
# script's order, whatever the order of STAGES. STAGES picks stages for a partial rerun, e.g.
# STAGES="bench_blend" BUDGET_S=120.
# Seen on an H200 (2026-11-28, b491c71): the 32 GPU tests on 4 xdist workers 164 s (pytest: 138 s);
# bench_blend 63 s; bench_peers cut by its then 240 s limit after five of its six providers (now 300 s);
# bench_deep alone 129 s. Run 1 (tests, blend, peers) and run 2 (bench_deep) held the machine 727 s of the
# 900 s lease, its start included.
set -uo pipefail
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
: > "$OUT/stages.txt"
BUDGET_S=${BUDGET_S:-$(( DRY ? 900 : 560 ))}
# STAGES: the stages to run. Left out by default: bench_sdxl (bench_peers on the SDXL config at 1024x1024, 30
# steps, for a lease with time to spare), bench_unet (the M sweep) and bench_compile (cold compile of both
# graphs over empty caches, each in a fresh process, as inductor comes, with the reuse graph compiled by a
# background worker, and with the keyframe graph in 3 parts, two of them compiled by workers:
# STAGES=bench_compile BUDGET_S=300; about 4 minutes expected on an H200 from the 97 s cold compile seen
# there, an estimate; COMPILE_VARIANTS=default,parts3 for fewer; COMPILE_PHASES=cold,portable adds, for each
# variant, a fresh process over empty caches that loads the portable cache artifacts its cold run saved) and
# bench_methods (FRDiff M=2 and M=3 and DeepCache at interval 3, all compiled without CUDA graphs, against
# eager: the two methods on equal footing;
# STAGES=bench_methods BUDGET_S=300) and bench_calls (SD 1.5 with a UNet call per view, 4 views: call slots
# under compiled graphs and CUDA graphs; one graph pair to compile; STAGES=bench_calls BUDGET_S=240) and
# bench_deep (cache_point="deep", DeepCache's method on frdiff's graphs, at intervals 3 and 2 with CUDA
# graphs, against eager and compiled stock; STAGES=bench_deep BUDGET_S=300) and profile_graphs (each kernel's
# launches and device time in one keyframe and one reuse call, compiled without CUDA graphs: where the reuse
# call's time goes; it runs after bench_peers, so STAGES="gpu_tests bench_peers profile_graphs" measures the
# cold compile in bench_peers and profiles over inductor's warm caches) and profile_deep (the same for
# cache_point="deep", whose keyframe graph is another compile, cold) and bench_layouts (FRDiff M=2 and M=3 and
# compiled stock on a channels_last copy of the UNet, and FRDiff M=2 on the NCHW UNet in the same run: whether
# channels_last convolutions make the reuse call cheaper; three cold compiles, about 290 s by the H200's compile
# times, an estimate, with frdiff-m2 last so that a cut loses only the comparison;
# STAGES=bench_layouts BUDGET_S=320) and bench_quant (compiled stock and FRDiff M=2 and M=3 on the UNet
# quantized by torchao, QUANTIZE=float8-dynamic unless set, a bench_peers --quantize name; carry torchao's
# wheel: ../shared/gpu/carry-wheels torchao==0.18.0; two cold compiles; STAGES=bench_quant BUDGET_S=320) and
# bench_offpath (every resnet's conv2, the reuse call's convolutions off the sample's path, one after another
# against split over 2-4 streams and grouped by shape, in captured graphs: whether running them at once could
# bring the reuse call under its FLOP share; no compile, so seconds, an estimate; STAGES=bench_offpath BUDGET_S=90).
STAGES=" ${STAGES:-gpu_tests bench_blend bench_peers} "
START=$(date +%s)

# stage NAME LIMIT_S COMMAND...: run with the smaller of its limit and what the deadline leaves.
stage() {
  local name=$1 limit=$2 left rc began
  shift 2
  [[ "$STAGES" == *" $name "* ]] || return 0
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "$name skipped 0 (deadline)" >> "$OUT/stages.txt"
    return
  fi
  began=$(date +%s)
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "$name $rc $(( $(date +%s) - began ))" >> "$OUT/stages.txt"
  echo "=== $name: exit $rc after $(( $(date +%s) - began ))s" | tee -a "$LOG"
}

if (( DRY )); then
  PY=${PYTHON:-python}
  # Exercise DeepCache for real when its wheel is at hand (installed into a throwaway folder).
  if ls .whl/DeepCache-*.whl >/dev/null 2>&1; then
    SITE=$(mktemp -d)
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/DeepCache-*.whl && export PYTHONPATH="$SITE:${PYTHONPATH:-}"
  fi
  PEERS=(--dry-run)
  SDXL=()
  export FRDIFF_EMULATE_GPU=1
  TESTS_LIMIT=420  # CPU inductor on 2 cores: about 300 s for the 17 emulated GPU tests (2026-11-27)
  PYTEST=(-q -n 2 --dist load)
  BLEND=(--quick)
  OFFPATH=(--config tiny --latent 16 --dtype float32 --repeats 3)
  UNET=(--small --latent 8 --steps 4 --repeats 1)
  COMPILE=(--dry-run --variants default,parts3 --phases "${COMPILE_PHASES:-cold}")
  CALLS=(--config tiny --latent 16 --steps 4)
  PROFILE=(--small --latent 8 --calls 2)
  QUANT=(--quantize int8-weight-only)  # float8 needs a GPU's float8 matrix products
else
  PY=python3
  export PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || { echo "wheel install failed"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 \
    || { echo "project install failed"; tail -20 "$LOG"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$LOG"
  PEERS=()
  TESTS_LIMIT=230
  SDXL=(--config sdxl --latent 128 --steps 30 --loops 3 --providers eager,frdiff-m2,compiled-static,frdiff-m3)
  BLEND=()
  OFFPATH=()
  # pytest-timeout (in the GPU image): a slow test fails with its traceback instead of the stage's kill
  # swallowing every failure report. pytest-xdist (in the image too): most of the stage is inductor
  # compiling tiny UNets on the host, so 4 workers on the 16 cores share it out; per test file
  # (loadfile) would leave test_cuda_runtime.py's 22 tests on one worker. Module-scoped runtimes are
  # then compiled once per worker that needs them, in parallel.
  PYTEST=(-v -p timeout --timeout 90 -n 4 --dist load)
  UNET=(--device cuda --latent 64 --repeats 10)
  COMPILE=(--variants "${COMPILE_VARIANTS:-default,background,parts3}" --phases "${COMPILE_PHASES:-cold}")
  CALLS=(--config sd15 --latent 64 --views 4 --steps 30 --repeats 3 --calls per-view)
  PROFILE=(--latent 64 --calls 10)
  QUANT=(--quantize "${QUANTIZE:-float8-dynamic}")
fi
$PY -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOG"

stage gpu_tests "$TESTS_LIMIT" $PY -m pytest -m gpu -p no:cacheprovider "${PYTEST[@]}" tests -rs --durations=8
# pytest's closing line ("8 passed, 1 failed in 180s"); when the stage limit killed pytest first, the
# verbose per-test lines counted so far. Nothing when a partial rerun left the stage out.
if [[ "$STAGES" == *" gpu_tests "* ]]; then
  if ! grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|deselected|errors?)\b.* in [0-9.]+s" "$LOG" | tail -1 | tr -d '=' > "$OUT/gpu_tests.txt" \
     || [[ ! -s "$OUT/gpu_tests.txt" ]]; then
    echo "cut short: $(grep -c ' PASSED' "$LOG") PASSED, $(grep -cE ' (FAILED|ERROR)' "$LOG") FAILED so far" > "$OUT/gpu_tests.txt"
  fi
fi
# BLEND_TARGET=1: bench_blend --target, only the cases its bandwidth targets read (sizes from 8 MB and the arena,
# no torch.compile provider or launch-configuration sweep), so it fits in a call with the tests and bench_peers.
[[ "${BLEND_TARGET:-0}" == 1 ]] && BLEND+=(--target)
stage bench_blend 100 $PY benchmarks/bench_blend.py "${BLEND[@]}" --csv "$OUT/bench_blend.csv"
stage bench_offpath 60 $PY benchmarks/bench_offpath.py "${OFFPATH[@]}" --csv "$OUT/bench_offpath.csv"
# PEER_PROVIDERS: bench_peers' providers for this run (its default set when unset), e.g. to add frdiff-m2-lo
# (conv_layout="inductor") and the compiled-static-nchw baseline in place of providers an earlier run measured.
stage bench_peers 300 $PY benchmarks/bench_peers.py "${PEERS[@]}" ${PEER_PROVIDERS:+--providers "$PEER_PROVIDERS"} \
  --csv "$OUT/bench_peers.csv"
# After bench_peers, whose frdiff-m2 graphs are the same inductor compiles: bench_peers measures the cold
# compile, and the profile finds both graphs in inductor's caches (its compile_s says how warm).
stage profile_graphs 150 $PY benchmarks/profile_graphs.py "${PROFILE[@]}" --csv "$OUT/profile_graphs.csv"
stage profile_deep 150 $PY benchmarks/profile_graphs.py "${PROFILE[@]}" --cache-point deep --csv "$OUT/profile_graphs.csv"
stage bench_methods 300 $PY benchmarks/bench_peers.py "${PEERS[@]}" \
  --providers eager,frdiff-m2-nocg,frdiff-m3-nocg,frdiff-deep3-nocg,deepcache-compiled --csv "$OUT/bench_methods.csv"
stage bench_deep 300 $PY benchmarks/bench_peers.py "${PEERS[@]}" \
  --providers eager,frdiff-deep3,frdiff-deep2,compiled-static --csv "$OUT/bench_deep.csv"
# The channels_last providers first (their numbers are the point), then the NCHW frdiff for the same run.
stage bench_layouts 300 $PY benchmarks/bench_peers.py "${PEERS[@]}" \
  --providers frdiff-m2-cl,compiled-static-cl,frdiff-m3-cl,frdiff-m2 --csv "$OUT/bench_layouts.csv"
stage bench_quant 300 $PY benchmarks/bench_peers.py "${PEERS[@]}" "${QUANT[@]}" \
  --providers compiled-static,frdiff-m2,frdiff-m3 --csv "$OUT/bench_quant.csv"
stage bench_sdxl 240 $PY benchmarks/bench_peers.py "${PEERS[@]}" "${SDXL[@]}" --csv "$OUT/bench_peers_sdxl.csv"
stage bench_unet 60 $PY benchmarks/bench_unet.py "${UNET[@]}" --csv "$OUT/bench_unet.csv"
stage bench_compile 300 $PY benchmarks/bench_compile.py "${COMPILE[@]}" --csv "$OUT/bench_compile.csv"
stage bench_calls 240 $PY benchmarks/bench_calls.py "${CALLS[@]}" --csv "$OUT/bench_calls.csv"

echo "=== total $(( $(date +%s) - START ))s; files in $OUT"
$PY benchmarks/gpu_summary.py "$OUT" $( (( DRY )) && echo --dry-run )
