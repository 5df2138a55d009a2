"""Compile the reuse graph in a second process while this one compiles the keyframe graph.

The first generation at a new input signature compiles two graphs, one after the other, and inductor's
lowering and code generation for each runs on one core. With `FRDiffConfig(background_compile=True)` a
worker process compiles the reuse graph while this process compiles the keyframe graph; at its first
call this process compiles the reuse graph too, and finds the worker's result in inductor's on-disk caches.

Invariants:
- The worker only fills the on-disk caches (AOTAutograd's, inductor's FX-graph cache, Triton's). This
  process always compiles the graph itself, exactly as without a worker, so correctness never depends on
  the worker: one that fails, is slow, or compiled under other settings (so that the cache keys differ)
  costs the wait and a compile here from scratch, nothing else. `wait` reports which it was.
- The worker gets the graph through torch's `GraphPickler`, node for node (a plain pickle re-traces the
  code and reorders nodes, so the keys would differ), the parameters as metadata only (it allocates
  uninitialised tensors of the same size, stride, dtype and device: the caches key parameters by metadata,
  never by value), this process's inductor and functorch configs, the process-wide numerics flags that
  pick kernels (`numerics.py`: deterministic algorithms, TF32, fp32 precisions, cuBLAS's and cuDNN's
  switches, SDPA's backends), and its thread count, for which CPU kernels are generated.
- A graph whose parameters include tensor subclasses (torchao's quantized weights) gets no worker (logged):
  the worker rebuilds parameters as plain tensors, which would not compute what a subclass does.
- Nothing is left behind: the job folder is removed and a running worker killed once the compile here no
  longer needs it (`wait`, `cancel`, or the object collected).
- A worker may be spawned before its graph exists (`spawn`, while this process exports the UNet): it
  imports torch and inductor, a few seconds of its start, then waits on its stdin for the job (`give`);
  one never given a job is stopped like any other.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import fx
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .numerics import apply_numerics_settings, numerics_settings

logger = logging.getLogger(__name__)

JOB_VERSION = 3  # 3: numerics settings hold the cuBLAS flags by name
# The worker's command line (`python -c`, so the module is imported once, by its own name).
_WORKER = "import sys; from frdiff_compile.background_compile import worker_main; worker_main(*sys.argv[1:])"


def _describe(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype, str(t.device), t.requires_grad


def _materialize(description: tuple) -> torch.Tensor:
    shape, stride, dtype, device, requires_grad = description
    return torch.empty_strided(shape, stride, dtype=dtype, device=device).requires_grad_(requires_grad)


def _replace_parameters(gm: fx.GraphModule, make: Callable[[torch.nn.Parameter], torch.Tensor]) -> None:
    """Replace every Parameter of `gm` by a Parameter over `make(it)`, keeping names and requires_grad."""
    for name, parameter in list(gm.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        module._parameters[leaf] = torch.nn.Parameter(make(parameter), requires_grad=parameter.requires_grad)


def _worker_can_help(args: tuple[torch.Tensor, ...], parameters: Iterable[torch.Tensor]) -> bool:
    """Whether a worker could fill the caches this process will look in for calls like `args` of a graph over
    `parameters`; why not is logged."""
    import torch._functorch.config
    import torch._inductor.config

    reason = None
    if not torch._inductor.config.fx_graph_cache or not torch._functorch.config.enable_autograd_cache:
        reason = "inductor's FX-graph or AOTAutograd cache is off, so the worker's result could not be found"
    elif any(torch.is_autocast_enabled(d) for d in {a.device.type for a in args}):
        reason = "autocast is on, and the worker would compile outside it"
    elif kinds := sorted({type(p).__name__ for p in parameters if is_traceable_wrapper_subclass(p)}):
        # The worker rebuilds parameters as plain tensors from their shapes; a subclass computes through its
        # own Python code (torchao's dequantizing matrix products), so the worker's graph would fail or differ.
        reason = f"the graph's parameters include tensor subclasses ({', '.join(kinds)}), which a worker cannot rebuild"
    if reason is not None:
        logger.info("background compile not started: %s", reason)
    return reason is None


class BackgroundCompile:
    """A worker process compiling one graph into inductor's on-disk caches."""

    def __init__(self, process: subprocess.Popen, folder: Path, started: float) -> None:
        self.process = process
        self.folder = folder
        self.started = started
        # Kill the worker and remove its folder if this object goes away first (an entry dropped early).
        self._finalizer = weakref.finalize(self, _stop, process, str(folder))

    @classmethod
    def _launch(cls, job: bytes | None, device: torch.device | None = None) -> BackgroundCompile | None:
        """A worker over a new job folder (its log there), given `job` on its command line, or, for None,
        waiting on its stdin for one after readying `device`; None (logged) if it could not start."""
        folder = Path(tempfile.mkdtemp(prefix="frdiff_compile_job_"))
        argv = ["--ahead", str(device)]
        if job is not None:
            (folder / "job.pkl").write_bytes(job)
            argv = ["--job", str(folder / "job.pkl")]
        log = open(folder / "worker.log", "wb")  # noqa: SIM115 - the worker writes it; closed right after the start
        # This process's import path, so the worker finds this package (and torch) wherever they came from.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            process = subprocess.Popen([sys.executable, "-c", _WORKER, *argv], env=env, stdout=log,
                                       stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL if job is not None else subprocess.PIPE)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            logger.info("background compile not started: %s", exc)
            return None
        finally:
            log.close()
        return cls(process, folder, time.perf_counter())

    @classmethod
    def spawn(cls, args: tuple[torch.Tensor, ...], parameters: Iterable[torch.Tensor]) -> BackgroundCompile | None:
        """A worker started ahead of its job, for graphs over `parameters` called like `args` (`give` hands it
        the job)."""
        if not _worker_can_help(args, parameters):
            return None
        worker = cls._launch(None, args[0].device)
        if worker is not None:
            logger.info("background worker started ahead of its job (pid %d)", worker.process.pid)
        return worker

    def give(self, gm: fx.GraphModule, args: tuple[torch.Tensor, ...], options: dict) -> bool:
        """Hand a worker from `spawn` its job: compile `gm` for calls like `args` with inductor `options`.
        False (logged, and the worker stopped) if the job could not be serialized or the worker is gone."""
        try:
            (self.folder / "job.pkl").write_bytes(_job(gm, args, options))
            self.process.stdin.write(f"{self.folder / 'job.pkl'}\n".encode())
            self.process.stdin.close()
        except Exception as exc:  # noqa: BLE001 - anything here means: compile in this process, as without a worker
            logger.info("background compile not started: the job could not be handed over (%s: %s)",
                        type(exc).__name__, exc)
            self.cancel()
            return False
        self.started = time.perf_counter()
        logger.info("background compile handed to worker %d, started ahead, for a graph of %d nodes",
                    self.process.pid, len(gm.graph.nodes))
        return True

    @classmethod
    def start(cls, gm: fx.GraphModule, args: tuple[torch.Tensor, ...], options: dict,
              spare: list[BackgroundCompile] | None = None) -> BackgroundCompile | None:
        """Start compiling `gm` for calls like `args` with inductor `options`; None (logged) if it cannot.
        A worker from `spare` (spawned ahead; taken off the list) gets the job where there is one."""
        if not _worker_can_help(args, gm.parameters()):  # spare workers left on the list are stopped by their owner
            return None
        while spare:
            worker = spare.pop()
            if worker.give(gm, args, options):
                return worker
        try:
            job = _job(gm, args, options)
        except Exception as exc:  # noqa: BLE001 - anything unpicklable means: compile here, as without a worker
            logger.info("background compile not started: the graph or settings could not be serialized (%s: %s)",
                        type(exc).__name__, exc)
            return None
        worker = cls._launch(job)
        if worker is not None:
            logger.info("background compile started (pid %d) for a graph of %d nodes", worker.process.pid,
                        len(gm.graph.nodes))
        return worker

    def wait(self, timeout: float) -> str | None:
        """Wait for the worker; None if it filled the caches, else why not (its log's last lines)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            return f"the worker did not finish within {timeout:.0f} s"
        log = (self.folder / "worker.log").read_text(errors="replace") if self.folder.exists() else ""
        self.cancel()
        if code != 0:
            tail = " | ".join(log.strip().splitlines()[-3:]) or "no output"
            return f"the worker exited with status {code}: {tail}"
        logger.info("background compile finished in %.1f s", time.perf_counter() - self.started)
        return None

    def cancel(self) -> None:
        self._finalizer()


def _stop(process: subprocess.Popen, folder: str) -> None:
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()  # a worker spawned ahead and never given a job
    if process.poll() is None:
        process.kill()
        process.wait()
    shutil.rmtree(folder, ignore_errors=True)


def _job(gm: fx.GraphModule, args: tuple[torch.Tensor, ...], options: dict) -> bytes:
    import torch._functorch.config
    import torch._inductor.config
    from torch._subclasses import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler, Options

    from .compiled_graph import copy_graph_module

    # A copy over the same nodes whose parameters are fake tensors: pickled as metadata, never as values.
    clone = copy_graph_module(gm)
    _replace_parameters(clone, FakeTensorMode().from_tensor)
    return pickle.dumps({
        "version": JOB_VERSION,
        # ops_filter=None: the graphs call this project's blend op, which the worker registers by import.
        "graph": GraphPickler.dumps(clone, Options(ops_filter=None)),
        "args": [_describe(a) for a in args],
        "options": options,
        "inductor_config": torch._inductor.config.save_config(),
        "functorch_config": torch._functorch.config.save_config(),
        "numerics": numerics_settings(),
        # Inductor's CPU kernels are generated for this many threads, so the cache keys differ with it.
        "threads": torch.get_num_threads(),
    })


def _run_job(path: str) -> None:
    """The worker: rebuild the graph with uninitialised parameters and compile it as the runtime would."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._subclasses import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from . import kernels  # noqa: F401 - registers the blend ops the graph calls
    from .compiled_graph import compile_with_inductor

    job = pickle.loads(Path(path).read_bytes())
    if job["version"] != JOB_VERSION:
        raise SystemExit(f"job format {job['version']}, this worker reads {JOB_VERSION}")
    torch._inductor.config.load_config(job["inductor_config"])
    torch._functorch.config.load_config(job["functorch_config"])
    apply_numerics_settings(job["numerics"])
    torch.set_num_threads(job["threads"])
    gm = GraphPickler.loads(job["graph"], FakeTensorMode(shape_env=ShapeEnv()))
    _replace_parameters(gm, lambda parameter: _materialize(_describe(parameter)))
    args = tuple(_materialize(d) for d in job["args"])
    with torch.no_grad():  # the runtime compiles its graphs as inference graphs
        compile_with_inductor(gm, args, job["options"])


def worker_main(how: str, what: str) -> None:
    """The worker process's entry point (`_WORKER`): "--job PATH" runs the job at PATH; "--ahead DEVICE" (a
    worker spawned ahead) first does what takes a worker's start its seconds, importing inductor and
    making DEVICE's context, while the parent exports, then runs the job whose path arrives on stdin."""
    logging.basicConfig(level=logging.WARNING)
    path = what
    if how == "--ahead":
        import torch._inductor.compile_fx  # noqa: F401

        from . import kernels  # noqa: F401

        torch.empty(1, device=what)  # a CUDA context takes a second or more to make
        path = sys.stdin.readline().strip()
        if not path:  # stdin closed without a job: the parent had none for this worker
            os._exit(0)
    _run_job(path)
    os._exit(0)  # skip interpreter teardown of inductor's compile pools: the caches are written already
