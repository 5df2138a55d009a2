"""The module globals the UNet's code looks up (`frdiff_compile/code_reads.py`): rebinding one after capture
(SageAttention's `F.scaled_dot_product_attention = sageattn`, a patched diffusers function) must rebuild the
graphs, and nothing else may: no graph is rebuilt for a value set again, and reading touches no lazy module.
"""

import types

import torch
import torch.nn.functional as F
from test_module_values import tiny_runtime

from frdiff_compile.code_reads import CodeReads


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), vars(module))  # noqa: S102 - a module made for the test
    return module


SOURCE = """
import functools
import torch
scale = 2.0

def decorate(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)
    return wrapper

class Block:
    @decorate  # as diffusers decorates UNet2DConditionModel.forward: the wrapper's own code reads no global
    def call(self):
        return inner()

    def forward(self, x):
        return [torch.nn.functional.silu(v) * scale for v in x]  # nested code: a comprehension

    @property
    def width(self):
        return helper()

def helper():
    return 1

def inner():
    return 1
"""


def _code(klass: type) -> tuple:
    """`klass` as `Fingerprint.code` holds it."""
    code_types = (types.FunctionType, property, classmethod, staticmethod)
    return ((klass, tuple(v for v in vars(klass).values() if isinstance(v, code_types))),)


def test_reads_follow_globals_into_modules_and_compare_scalars_by_value(monkeypatch):
    module = _module("frdiff_test_code_reads", SOURCE)
    code = _code(module.Block)
    reads = CodeReads()
    before = reads.read(code)
    assert reads.read(code) == before and hash(reads.read(code)) == hash(before)

    module.scale = float("2.0")  # a new float object of the same value: no change
    assert reads.read(code) == before
    module.scale = 3.0
    assert reads.read(code) != before
    module.scale = 2.0

    silu = F.silu  # reached through torch, nn and functional, from a comprehension nested in forward
    monkeypatch.setattr(F, "silu", lambda x: silu(x) * 0.5)
    assert reads.read(code) != before
    monkeypatch.undo()
    assert reads.read(code) == before

    module.helper = lambda: 2  # read by a property
    changed = reads.read(code)
    assert changed != before
    module.inner = lambda: 2  # read by the function a decorator wrapped
    assert reads.read(code) != changed


def test_a_class_patched_to_read_other_globals_is_read_anew_and_lazy_modules_stay_unloaded(monkeypatch):
    module = _module("frdiff_test_code_reads_lazy", SOURCE + "\nother = 1\n")
    reads = CodeReads()
    before = reads.read(_code(module.Block))
    patched = _module("frdiff_test_code_reads_patch", "def forward(self, x):\n    return x * other\n").forward
    patched.__globals__["other"] = 1  # the patch's own module global
    monkeypatch.setattr(module.Block, "forward", patched)
    after = reads.read(_code(module.Block))
    assert after != before
    patched.__globals__["other"] = 5
    assert reads.read(_code(module.Block)) != after, "the patch's globals are read, not the memo's old ones"

    # A lazy module (diffusers' own, torch's submodules) loads an attribute in its `__getattr__`: never called.
    lazy = _module("frdiff_test_code_reads_lazy_module",
                   "calls = []\ndef __getattr__(name):\n    calls.append(name)\n    raise AttributeError(name)\n")
    user = _module("frdiff_test_code_reads_user", "def f():\n    return lazy.weights\n")
    user.lazy = lazy
    CodeReads().read(((object, (user.f,)),))
    assert lazy.calls == []

def test_rebinding_a_global_the_unet_calls_rebuilds_and_rebinding_it_back_reuses(monkeypatch):
    """SageAttention's documented drop-in, `F.scaled_dot_product_attention = sageattn`, after the graphs were
    built: before code_reads the runtime went on serving the stock attention (1.27 off the patched UNet on this
    test's 4 steps, silently). A scaled SDPA stands in for it; then a diffusers module function, patched."""
    import diffusers.models.embeddings as embeddings

    _, fr, stock, run = tiny_runtime()
    before = run()
    assert run().equal(before) and fr.stats.captures == 1, "nothing the runtime or diffusers does rebinds them"

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa(*a, **k) * 0.5)
    assert torch.equal(run(), stock()) and not torch.equal(before, stock()) and fr.stats.captures == 2
    monkeypatch.undo()

    embedding = embeddings.get_timestep_embedding
    monkeypatch.setattr(embeddings, "get_timestep_embedding", lambda *a, **k: embedding(*a, **k) * 0.5)
    assert torch.equal(run(), stock()) and fr.stats.captures == 3
    monkeypatch.undo()
    assert torch.equal(run(), before) and fr.stats.captures == 3, "back to the first settings: their graphs"
