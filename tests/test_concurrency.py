"""Threads calling runtimes at once: one runtime shared by request threads (diffusers' server recipe shares the
UNet), a copy per thread, runtimes over two UNets capturing at once, a call held off while another runtime
exports, inductor compiles in two threads; the export gate's and the CUDA stream order's logic. The helpers
serve the GPU versions in test_cuda_runtime.py too."""

import contextlib
import copy
import sys
import threading

import pytest
import torch
from conftest import make_unet, max_rel_error, unet_inputs
from diffusers.models.attention_processor import AttnProcessor2_0
from test_runtime import optimized_fn, sample, scheduler

import frdiff_compile
from frdiff_compile import FRDiffConfig
from frdiff_compile.concurrency import ExportGate, StreamOrder

STEPS = 8
SEEDS = (0, 1, 2)


@pytest.fixture
def frequent_switches():
    # Hand the interpreter to another thread as often as it can, so steps overlap wherever they can.
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def in_threads(models, cond, own_streams=False):
    """Thread k runs DDIM from seed SEEDS[k] through models[k], with a scheduler of its own (as a server's
    request does) and, with `own_streams`, a CUDA stream of its own; all start together. Returns each
    thread's final latents."""
    device, dtype = cond["encoder_hidden_states"].device, cond["encoder_hidden_states"].dtype
    start = threading.Barrier(len(models))
    results, errors = {}, []

    def request(k):
        try:
            sched = scheduler("sd15")
            sched.set_timesteps(STEPS, device=device)
            x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(SEEDS[k])).to(device, dtype)
            start.wait()
            stream = torch.cuda.stream(torch.cuda.Stream()) if own_streams else contextlib.nullcontext()
            with stream, torch.no_grad():
                for t in sched.timesteps:
                    x = sched.step(models[k](x, t, **cond).sample, t, x).prev_sample
            results[k] = x
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=request, args=(k,), name=f"request-{k}") for k in range(len(models))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if own_streams:
        torch.cuda.synchronize()
    return [results[k] for k in range(len(models))]


@contextlib.contextmanager
def recorded_kinds(entry):
    """Thread name -> the kind ("full", "reuse", "skip") of each of its steps through `entry`, recorded
    inside the runtime's step lock. A generation's first step replayed ahead of the module-state check
    counts when it is committed (`commit_full`)."""
    kinds = {}
    methods = {"run_full": "full", "commit_full": "full", "run_reuse": "reuse", "run_skip": "skip"}
    for method, kind in methods.items():
        def recorded(*args, _run=getattr(entry, method), _kind=kind):
            kinds.setdefault(threading.current_thread().name, []).append(_kind)
            return _run(*args)

        setattr(entry, method, recorded)
    try:
        yield kinds
    finally:
        for method in methods:
            delattr(entry, method)  # the class's methods again


def keyframes_run(kinds, k):
    """Thread k's keyframe mask: the schedule's, plus one wherever another thread's step had come between
    two of its own. Its trajectory must be exactly a lone generation with these keyframes."""
    mask = tuple(kind == "full" for kind in kinds[f"request-{k}"])
    assert len(mask) == STEPS, kinds
    return mask


@pytest.mark.filterwarnings("ignore:frdiff_compile. generations are interleaved")
def test_threads_sharing_one_runtime_each_get_their_own_generation(frequent_switches):
    # Without the runtime's step lock, one thread's step could start its generation, another's could start
    # its own, and the first would then run under the second's (reading caches it never wrote); with CUDA
    # graphs (emulated here) a replay could run over another thread's inputs or hand out its output.
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    fr = frdiff_compile.optimize(unet)
    fr.graph_backend_override = "emulate"
    sample(optimized_fn(fr, cond), scheduler("sd15"), 2)  # a keyframe and a reuse step: both graphs captured
    with recorded_kinds(fr.graph_entries()[0]) as kinds:
        got = in_threads([fr] * len(SEEDS), cond)
    for k in range(len(SEEDS)):
        mask = keyframes_run(kinds, k)
        alone = frdiff_compile.optimize(unet, FRDiffConfig(keyframes=mask))
        expected = sample(optimized_fn(alone, cond), scheduler("sd15"), STEPS, seed=SEEDS[k])
        diff = (got[k] - expected).abs().max()
        assert torch.equal(got[k], expected), f"thread {k}, keyframes {mask}: max diff {diff}"
    assert fr.stats.eager_calls == 0 and fr.stats.captures == 1, fr.stats


def test_a_runtime_per_thread_runs_each_generation_as_alone(frequent_switches, recwarn):
    unet = make_unet("sd15", layers_per_block=1)
    cond = unet_inputs("sd15")
    shared = frdiff_compile.optimize(unet)
    copies = [copy.copy(shared) for _ in SEEDS]
    got = in_threads(copies, cond)
    alone = frdiff_compile.optimize(unet)
    for k, runtime in enumerate(copies):
        expected = sample(optimized_fn(alone, cond), scheduler("sd15"), STEPS, seed=SEEDS[k])
        assert torch.equal(got[k], expected), f"thread {k}"
        stats = runtime.stats
        assert (stats.generations, stats.resumed_generations) == (1, 0) and stats.reuse_calls > 0, stats
    assert not [w for w in recwarn if "frdiff_compile" in str(w.message)]


def test_runtimes_over_two_unets_capture_in_two_threads_at_once(frequent_switches, recwarn):
    # torch.export is not thread-safe: without the capture's process-wide lock both exports failed here and
    # both runtimes ran the eager UNet (and would have for every later generation at that shape).
    unets = [make_unet("sd15", layers_per_block=1) for _ in range(2)]
    cond = unet_inputs("sd15")
    runtimes = [frdiff_compile.optimize(unet) for unet in unets]
    got = in_threads(runtimes, cond)
    for k, (unet, runtime) in enumerate(zip(unets, runtimes)):
        expected = sample(optimized_fn(frdiff_compile.optimize(unet), cond), scheduler("sd15"), STEPS, seed=SEEDS[k])
        # Not bit for bit: these two runtimes share no lock, so their ops really run at once, and CPU ops
        # split their reductions by the intra-op threads they get (5e-7 relative seen here).
        err = max_rel_error(got[k], expected)
        assert err < 1e-5, f"runtime {k}: relative error {err:.2e}"
        stats = runtime.stats
        assert (stats.captures, stats.capture_failures, stats.eager_calls) == (1, 0, 0), stats
    assert not [w for w in recwarn if "frdiff_compile" in str(w.message)]


class _Pause:
    def __init__(self) -> None:
        self.entered, self.release, self.exporting = threading.Event(), threading.Event(), None


class _PausesOnce(AttnProcessor2_0):
    """SDPA attention that, at its first call, says so and waits to be released: the first call of a new
    runtime's UNet is inside its export. (What it records is kept outside the processor, whose own state a
    capture refuses to see change.)"""

    def __init__(self, pause: _Pause) -> None:
        super().__init__()
        self.pause = pause

    def __call__(self, *args, **kwargs):
        if not self.pause.entered.is_set():
            self.pause.exporting = torch.compiler.is_exporting()
            self.pause.entered.set()
            self.pause.release.wait(60)
        return super().__call__(*args, **kwargs)


def test_a_call_waits_while_another_runtime_exports_and_keeps_its_graphs(recwarn):
    # torch.export turns cuDNN off process-wide while it traces. Without the export gate, runtime a's next
    # generation read that flag as a change of its numerics settings and built a second graph pair under the
    # export's flags (on a GPU it would also capture non-cuDNN convolutions, or fall back to eager).
    unets = [make_unet("sd15", layers_per_block=1) for _ in range(2)]
    cond = unet_inputs("sd15")
    a, b = (frdiff_compile.optimize(unet) for unet in unets)
    sample(optimized_fn(a, cond), scheduler("sd15"), 2)  # a's graph pair: built, nothing left to export
    pause = _Pause()
    unets[1].set_attn_processor(_PausesOnce(pause))
    results = {}

    def generate(name, runtime):
        results[name] = sample(optimized_fn(runtime, cond), scheduler("sd15"), STEPS)

    exporting = threading.Thread(target=generate, args=("b", b))
    exporting.start()
    assert pause.entered.wait(60), "b's first call never reached its attention"
    calling = threading.Thread(target=generate, args=("a", a))
    try:
        assert pause.exporting, "b paused outside its export"
        calling.start()
        calling.join(0.5)
        assert calling.is_alive() and a.stats.generations == 1, f"a's call ran during b's export: {a.stats}"
    finally:
        pause.release.set()
        exporting.join()
        calling.join()
    assert set(results) == {"a", "b"}, "a generation raised (printed above)"
    expected = sample(optimized_fn(frdiff_compile.optimize(unets[0]), cond), scheduler("sd15"), STEPS)
    assert max_rel_error(results["a"], expected) < 1e-5
    for runtime in (a, b):
        stats = runtime.stats
        assert (stats.captures, stats.capture_failures, stats.eager_calls) == (1, 0, 0), stats
    assert not [w for w in recwarn if "frdiff_compile" in str(w.message)]


def test_direct_inductor_compiles_in_two_threads_take_turns(frequent_switches):
    # Two runtimes' first generations in two threads compile at once. Inductor's compile is not thread-safe:
    # without dynamo's compile lock one of these two failed in each of 7 runs ("... already in dispatch cache").
    from frdiff_compile.compiled_graph import compile_with_inductor

    graphs = {}
    for layers in (2, 3):  # fx-traced here, one at a time: fx tracing is not thread-safe either
        module = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
        x = torch.randn(2, 16)
        graphs[layers] = (torch.fx.symbolic_trace(module), x, module(x))
    errors, results = [], {}

    def compile_one(layers):
        gm, x, expected = graphs[layers]
        try:  # cold each time (the on-disk caches' hits skip the tracing that collides)
            fn = compile_with_inductor(gm, (x,), {"force_disable_caches": True, "freezing": False})
            results[layers] = max_rel_error(fn(x), expected)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [_in_thread(lambda n=layers: compile_one(n)) for layers in graphs]
    for thread in threads:
        thread.join(120)
    assert not errors and set(results) == set(graphs), errors
    assert max(results.values()) < 1e-5, results


def _in_thread(body) -> threading.Thread:
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread


def test_the_export_gate_orders_exports_against_calls_in_other_threads():
    gate, log = ExportGate(), []
    call_held, call_done, export_started = threading.Event(), threading.Event(), threading.Event()

    def long_call():
        with gate.call():
            call_held.set()
            call_done.wait(10)
            log.append("call ends")

    def export():
        export_started.set()
        with gate.export():
            log.append("export")

    def late_call():
        with gate.call():
            log.append("late call")

    caller = _in_thread(long_call)
    call_held.wait(10)
    exporter = _in_thread(export)
    export_started.wait(10)
    exporter.join(0.2)
    assert exporter.is_alive() and not log, "an export ran during another thread's call"
    late = _in_thread(late_call)
    late.join(0.2)
    assert late.is_alive() and not log, "a new call went ahead of a waiting export"
    call_done.set()
    for thread in (caller, exporter, late):
        thread.join(10)
    assert log == ["call ends", "export", "late call"], log


def test_calls_go_ahead_of_a_waiting_export_only_while_a_call_compiles():
    # A runtime's first generation compiles inside its call for minutes cold; an export waiting for that call
    # cannot start before it ends, so other runtimes' calls need not wait it out.
    gate, log = ExportGate(), []
    compiling, compiled, compile_left = threading.Event(), threading.Event(), threading.Event()
    call_done = threading.Event()

    def compiling_call():
        with gate.call():
            with gate.long_work():
                compiling.set()
                compiled.wait(10)
            compile_left.set()
            call_done.wait(10)
            log.append("compiling call ends")

    def export():
        with gate.export():
            log.append("export")

    def other_call(name):
        with gate.call():
            log.append(name)

    caller = _in_thread(compiling_call)
    compiling.wait(10)
    exporter = _in_thread(export)
    while not gate._exports_waiting:  # the export is waiting for the compiling call
        exporter.join(0.01)
    _in_thread(lambda: other_call("call during the compile")).join(10)
    assert log == ["call during the compile"], log
    compiled.set()  # the compile is over, the call goes on: new calls wait behind the export again
    compile_left.wait(10)
    late = _in_thread(lambda: other_call("call after the compile"))
    late.join(0.2)
    assert late.is_alive() and log == ["call during the compile"], log
    call_done.set()
    for thread in (caller, exporter, late):
        thread.join(10)
    assert log == ["call during the compile", "compiling call ends", "export", "call after the compile"], log


def test_calls_that_export_from_inside_themselves_in_two_threads_do_not_wait_for_each_other():
    # A runtime's first call exports inside its own call: each export sets its thread's holds aside, and
    # calls re-enter (a nested call, or one made from inside the export) without waiting.
    gate, both_in, log = ExportGate(), threading.Barrier(2, timeout=10), []

    def first_call(name):
        with gate.call(), gate.call():
            both_in.wait()
            with gate.export(), gate.call():
                log.append(name)

    threads = [_in_thread(lambda n=name: first_call(n)) for name in ("a", "b")]
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads) and sorted(log) == ["a", "b"], log
    with gate.export():  # and nothing is left held
        pass


class _Stream:
    def __init__(self, device, name):
        self.device, self.name, self.waited_for = device, name, []

    def wait_stream(self, other):
        self.waited_for.append(other.name)


def test_a_step_on_another_stream_waits_for_the_last_steps_stream():
    # The logic of StreamOrder with stand-in streams; the GPU test above runs it on real ones.
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    a, b, other_device = _Stream(cuda0, "a"), _Stream(cuda0, "b"), _Stream(cuda1, "c")
    current = {"stream": a}
    order = StreamOrder(current_stream=lambda device: current["stream"])
    for stream in (a, a, b, b, a, other_device, b):
        current["stream"] = stream
        order.follow(stream.device)
    order.follow(torch.device("cpu"))  # CPU steps are ordered by the host: no stream is asked for
    # Each device's buffers follow that device's last stream (b's second turn waits for a, across the step
    # on the other device); nothing waits on itself or on another device's stream.
    waited = (a.waited_for, b.waited_for, other_device.waited_for)
    assert waited == (["b"], ["a", "a"], []), waited
