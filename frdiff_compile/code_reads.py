"""The module globals the UNet's code looks up when it runs, as one comparable part of its fingerprint.

A captured graph bakes in whatever the traced code found under a global name: `F.scaled_dot_product_attention`
in diffusers' attention processors, `get_timestep_embedding` in its embeddings, `F.group_norm` in torch's
GroupNorm. Rebinding one after capture (`F.scaled_dot_product_attention = sageattn`, a common speed trick,
or a patched diffusers function) changes what the eager UNet computes and nothing else the fingerprint sees,
so the graphs would go on serving the old code. dynamo guards on such globals; this is the runtime's guard.

Invariants:
- Read, per class in `Fingerprint.code`, from its functions' code objects (and the code nested in them:
  closures, comprehensions; and the functions decorators wrapped, by `__wrapped__`): every name they load that
  is a global of their module, and, where that global is a module, every further name of theirs that is one of
  its attributes, through submodules (`torch.nn.functional.silu` reads `torch`, then `nn`, `functional` and
  `silu`). One level deep: functions those globals name are tracked by identity, not followed. Followed, they
  reach far into the standard library through ModelMixin's save and load code (`re`, `tempfile`, `inspect`;
  541 functions for SD 1.5's classes against 201), where module globals are rebound as lazy caches
  (`tempfile._name_sequence`), which would rebuild graphs for nothing.
- Host metadata only: dictionary reads, no attribute access that could run code or import a module (a lazy
  module's attribute not loaded yet is simply absent, at every read alike).
- Compared by identity, except plain numbers, strings and flags, which compare by value (`scale = 0.5` set
  again is a new float object, not a change). The values themselves are held by `GlobalValues`, so an id it
  compares can never belong to a new object.
- `CodeReads` is a memo only: which (namespace, name) pairs a class's functions read, recomputed whenever the
  class's functions change. The values are read again at every snapshot.
"""

from __future__ import annotations

import types

SCALAR_TYPES = frozenset({bool, int, float, str})  # compared by value, here and in module_values.py
_MISSING = object()


def _functions(code: tuple) -> list[types.FunctionType]:
    """The plain functions behind a class's functions, properties, class and static methods, and the
    functions decorators wrapped (`__wrapped__`: diffusers wraps `UNet2DConditionModel.forward` so)."""
    members = []
    for member in code:
        if isinstance(member, property):
            members += [member.fget, member.fset, member.fdel]
        elif isinstance(member, (classmethod, staticmethod)):
            members.append(member.__func__)
        else:
            members.append(member)
    found: dict[types.FunctionType, None] = {}  # ordered, and each function once
    for function in members:
        while isinstance(function, types.FunctionType) and function not in found:
            found[function] = None
            function = vars(function).get("__wrapped__")
    return list(found)


def _names(code: types.CodeType) -> set[str]:
    """Every global and attribute name `code` and the code nested in it load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _reads(functions: list[types.FunctionType]) -> list[tuple[dict, str]]:
    """The (namespace, name) pairs `functions` look up: their module's globals, and the attributes of the
    modules among them that they name."""
    found: dict[tuple[int, str], tuple[dict, str]] = {}
    for function in functions:
        names = _names(function.__code__)
        namespace = function.__globals__
        pending = [(namespace, name) for name in names if name in namespace]
        visited: set[tuple[int, str]] = set()  # per function: another one's names open other attributes
        while pending:
            namespace, name = pending.pop()
            if (id(namespace), name) in visited:
                continue
            visited.add((id(namespace), name))
            found[id(namespace), name] = (namespace, name)
            value = namespace[name]
            if isinstance(value, types.ModuleType):
                attributes = vars(value)
                pending += [(attributes, n) for n in names if n in attributes]
    return list(found.values())


class GlobalValues:
    """The values one snapshot read, held so that no id in `key` can be taken by a new object while a
    fingerprint holding this is compared against; equal and hashed by `key` alone."""

    __slots__ = ("key", "values")

    def __init__(self, values: list) -> None:
        self.values = values
        self.key = tuple([v if type(v) in SCALAR_TYPES else id(v) for v in values])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GlobalValues) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"GlobalValues({len(self.values)} names)"


class CodeReads:
    """Per class, the pairs its functions read (a memo: the class's functions tuple is the check)."""

    def __init__(self) -> None:
        self._by_class: dict[type, tuple[tuple, list[tuple[dict, str]]]] = {}

    def read(self, code: tuple) -> GlobalValues:
        """The current values of the globals the classes in `code` ((class, functions) pairs) look up."""
        pairs: list[tuple[dict, str]] = []
        for klass, functions in code:
            known = self._by_class.get(klass)
            if known is None or known[0] != functions:
                known = self._by_class[klass] = (functions, _reads(_functions(functions)))
            pairs += known[1]
        return GlobalValues([namespace.get(name, _MISSING) for namespace, name in pairs])
