"""Check the twin's port models against micropython-esp32-stubs: the twin offers nothing a board
does not have.

Every public name a model module defines or re-exports must exist in the stub of the same
module, as the same kind of thing (function, class, constant); a constant the stub gives a
value must have that value; every parameter a model function takes must be accepted by one of
the stub's overloads (by position, or by keyword where the stub allows it) and defaults the
stub spells out must match. MicroPython cannot declare positional-only parameters: a model
parameter in the place of a stub's positional-only one is taken by position, whatever its name.
"""

from __future__ import annotations

import ast
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STUBS = Path(sysconfig.get_paths()["purelib"])
# C-level protocols a Python class can only spell as methods: a stream's ioctl (select and
# asyncio poll a machine.UART through it; io.IOBase subclasses implement it in Python)
PROTOCOL = {"ioctl"}


@dataclass
class Param:
    name: str
    kind: str  # posonly, pos, kwonly, varargs, varkw
    default: ast.expr | None = None


# Where the stubs disagree with MicroPython 1.25's own documentation (docs/library/*.rst in
# the source tree the twin's VM is built from): the documented signature is checked instead.
DOCUMENTED = {
    # bluetooth.rst: ".. method:: BLE.gatts_notify(conn_handle, value_handle, data=None, /)"
    # (the stub drops conn_handle)
    "bluetooth.BLE.gatts_notify": [[Param("conn_handle", "posonly"),
                                    Param("value_handle", "posonly"),
                                    Param("data", "posonly", ast.Constant(None))]],
}


@dataclass
class Scope:
    """The names of a module or a class: functions (overloads), classes, constants."""

    functions: dict[str, list[list[Param]]] = field(default_factory=dict)
    classes: dict[str, Scope] = field(default_factory=dict)
    constants: dict[str, ast.expr | None] = field(default_factory=dict)
    imported: set[str] = field(default_factory=set)

    def has(self, name: str) -> bool:
        return (name in self.functions or name in self.classes or name in self.constants
                or name in self.imported)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[Param]:
    a = fn.args
    out: list[Param] = []
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += a.defaults
    for i, arg in enumerate(positional):
        out.append(Param(arg.arg, "posonly" if i < len(a.posonlyargs) else "pos", defaults[i]))
    if a.vararg:
        out.append(Param(a.vararg.arg, "varargs"))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        out.append(Param(arg.arg, "kwonly", d))
    if a.kwarg:
        out.append(Param(a.kwarg.arg, "varkw"))
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if method and not static and out and out[0].kind in ("pos", "posonly"):
        out = out[1:]  # self / cls
    return out


def scope(tree: ast.Module | ast.ClassDef, method: bool = False) -> Scope:
    s = Scope()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            s.functions.setdefault(node.name, []).append(_params(node, method))
        elif isinstance(node, ast.ClassDef):
            s.classes[node.name] = scope(node, method=True)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            s.constants[node.target.id] = node.value
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    s.constants[t.id] = node.value
        elif isinstance(node, ast.ImportFrom):
            s.imported.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            s.imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    return s


def _literal(e: ast.expr | None) -> object:
    if isinstance(e, ast.Constant) and e.value is not Ellipsis:
        return e.value
    if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub) and \
            isinstance(e.operand, ast.Constant) and isinstance(e.operand.value, int | float):
        return -e.operand.value
    return Ellipsis  # not a plain literal: nothing to compare


def _accepts(stub: list[Param], model: list[Param]) -> str | None:
    """Why the stub overload does not accept the model's parameters, or None if it does."""
    positional = [p for p in stub if p.kind in ("posonly", "pos")]
    by_name = {p.name: p for p in stub if p.kind in ("pos", "kwonly")}
    varargs = any(p.kind == "varargs" for p in stub)
    varkw = any(p.kind == "varkw" for p in stub)
    i = 0
    for m in model:
        if m.kind == "varargs":
            if not varargs:
                return f"*{m.name}: the port takes no extra positional arguments"
            continue
        if m.kind == "varkw":
            if not varkw:
                return f"**{m.name}: the port takes no arbitrary keywords"
            continue
        if m.kind == "kwonly":
            s = by_name.get(m.name)
            if s is None and not varkw:
                return f"keyword {m.name!r}: the port has no such parameter"
        else:
            if i < len(positional):
                s = positional[i]
                if s.kind == "pos" and s.name != m.name:
                    return f"parameter {i + 1} is {s.name!r} on the port, not {m.name!r}"
            elif not varargs:
                s = by_name.get(m.name)
                if s is None:
                    return f"parameter {m.name!r} (#{i + 1}): the port takes {i} positional"
            else:
                s = None
            i += 1
        if s is not None and m.default is not None:
            want, have = _literal(s.default), _literal(m.default)
            if want is not Ellipsis and have is not Ellipsis and want != have:
                return f"default of {m.name!r} is {want!r} on the port, not {have!r}"
    return None


def _union(overloads: list[list[Param]]) -> list[Param]:
    """One signature taking every call shape of the overloads."""
    positional = max(([p for p in o if p.kind in ("posonly", "pos")] for o in overloads), key=len)
    out = list(positional)
    seen = {p.name for p in out}
    for o in overloads:
        for p in o:
            if p.kind == "kwonly" and p.name not in seen:
                out.append(p)
                seen.add(p.name)
    for kind in ("varargs", "varkw"):
        if any(p.kind == kind for o in overloads for p in o):
            out.append(Param(kind, kind))
    return out


def _public(where: str, kind: str, model: Any, stub: Any, problems: list[str]) -> list[str]:
    """The model's public names of one kind that the stub has too; the others are problems."""
    out = []
    for name in sorted(model):
        if (name.startswith("_") and name != "__init__") or name in PROTOCOL:
            continue
        if name in stub:
            out.append(name)
        else:
            problems.append(f"{where}.{name}: no such {kind} on the port")
    return out


def _check_scope(where: str, stub: Scope, model: Scope) -> list[str]:
    problems: list[str] = []
    for name in _public(where, "function", model.functions, stub.functions, problems):
        overloads = DOCUMENTED.get(f"{where}.{name}", stub.functions[name])
        for sig in model.functions[name]:
            reasons = [_accepts(s, sig) for s in overloads]
            if len(overloads) > 1 and all(reasons):
                # one C function behind the overloads: it takes any of their call shapes
                reasons.append(_accepts(_union(overloads), sig))
            if all(reasons):
                problems.append(f"{where}.{name}: {'; '.join(r for r in reasons if r)}")
    for name in _public(where, "class", model.classes, stub.classes, problems):
        problems += _check_scope(f"{where}.{name}", stub.classes[name], model.classes[name])
    for name in _public(where, "constant", model.constants, stub.constants, problems):
        want, have = _literal(stub.constants[name]), _literal(model.constants[name])
        if want is not Ellipsis and have is not Ellipsis and want != have:
            problems.append(f"{where}.{name} = {have!r}: the port has {want!r}")
    for name in sorted(model.imported):
        if not name.startswith("_") and not stub.has(name):
            problems.append(f"{where}.{name}: imported into the model, not on the port")
    return problems


def check(module: str, model_source: str) -> list[str]:
    """Problems of one model module's source against the stub of the same name."""
    stub_file = STUBS / f"{module}.pyi"
    if not stub_file.exists():
        return [f"{module}: no stub {stub_file.name} in micropython-esp32-stubs"]
    stub = scope(ast.parse(stub_file.read_text()))
    return _check_scope(module, stub, scope(ast.parse(model_source)))
