"""The architecture of fastrlhf/ (ARCHITECTURE.md), held by tests.

* no import cycle among fastrlhf's modules, counting imports inside functions too (so a cycle
  cannot be hidden by moving an import into a function);
* an import inside a function of a fastrlhf module is allowed only with a ``# lazy:`` comment
  saying why (startup time of a command line, an optional heavy dependency);
* no module imports another module's underscore names (``from .x import _y``, ``x._y``);
* every custom op is registered once, with at most one autograd formula, and no op layer is
  mirrored per backend (no ``fastrlhf::native_*`` ops);
* the native binding layer and the kernels import nothing from ``fastrlhf.ops``;
* backward receives no materialized gradient for an output nobody differentiates.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

import fastrlhf as fr
from helpers import TRITON_OK

ROOT = Path(fr.__file__).resolve().parent
KERNELS = Path(__import__("fastrlhf.kernels", fromlist=["_"]).__file__).resolve().parent


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        rel = ["kernels"] + list(path.relative_to(KERNELS).with_suffix("").parts)
    else:
        rel = list(path.relative_to(ROOT).with_suffix("").parts)
    if rel[-1] == "__init__":
        rel = rel[:-1]
    return ".".join(["fastrlhf"] + rel)


def _sources():
    for base in (ROOT, KERNELS):
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


MODULES = {_module_name(p): p for p in _sources()}


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(mod: str, path: Path):
    """``(line, imported module, names, inside a function, line text)`` for every fastrlhf
    import of ``mod``."""
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    is_pkg = path.name == "__init__.py"
    out = []

    def visit(node, in_func):
        for child in ast.iter_child_nodes(node):
            f = in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.startswith("fastrlhf"):
                        out.append((child.lineno, a.name, [], in_func, lines[child.lineno - 1]))
            elif isinstance(child, ast.ImportFrom):
                target = _resolve(mod, is_pkg, child.level, child.module)
                if target.startswith("fastrlhf"):
                    names = [a.name for a in child.names]
                    out.append((child.lineno, target, names, in_func,
                                lines[child.lineno - 1]))
            visit(child, f)

    visit(tree, False)
    return out


def _edges():
    """Module -> the fastrlhf modules it imports (a ``from pkg import name`` where ``name`` is a
    submodule counts as importing the submodule)."""
    edges = {}
    for mod, path in MODULES.items():
        deps = set()
        for _, target, names, _, _ in _imports(mod, path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            deps.update(subs)
            if target in MODULES and len(subs) < len(names) or not names:
                deps.add(target)
        edges[mod] = {d for d in deps if d in MODULES and d != mod}
    return edges


def _parents(mod: str):
    """A package's ``__init__`` runs before its submodules: importing ``a.b.c`` imports ``a`` and
    ``a.b``.  Those implicit edges are not the module's own choice, so they are not counted."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    edges = _edges()
    # Tarjan's strongly connected components.
    index, low, on, stack, sccs = {}, {}, set(), [], []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v] - _parents(v):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    assert sccs == [], f"import cycles in fastrlhf: {sccs}"


def test_function_level_imports_are_commented_lazy():
    bad = []
    for mod, path in MODULES.items():
        for line, target, _, in_func, text in _imports(mod, path):
            if in_func and "# lazy" not in text:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {text.strip()}")
    assert bad == [], ("imports inside functions need a '# lazy: why' comment (and must not "
                       "dodge a cycle):\n" + "\n".join(bad))


def _bound_modules(mod: str, path: Path) -> set:
    """Local names that ``mod`` binds to fastrlhf modules (``from .. import native``,
    ``import fastrlhf.ops.losses as L``)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node.level, node.module)
            for a in node.names:
                if f"{target}.{a.name}" in MODULES:
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    names.add(a.asname)
    return names


def test_no_private_names_imported_across_modules():
    bad = []
    for mod, path in MODULES.items():
        for line, target, names, _, text in _imports(mod, path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            parts = [p for p in target.split(".") if p.startswith("_")]
            if private or parts:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: {text.strip()}")
        bound = _bound_modules(mod, path)
        for node in ast.walk(ast.parse(path.read_text())):  # e.g. ``native._ext(...)``
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
                    and node.value.id in bound):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: "
                           f"{node.value.id}.{node.attr}")
    assert bad == [], "uses of another module's underscore names:\n" + "\n".join(bad)


def test_backends_import_nothing_from_the_op_layer():
    for mod in ("fastrlhf.native", "fastrlhf.tables", "fastrlhf.reference") + tuple(
            m for m in MODULES if m.startswith("fastrlhf.kernels")):
        for _, target, _, _, text in _imports(mod, MODULES[mod]):
            assert not target.startswith(("fastrlhf.ops", "fastrlhf.trainer",
                                          "fastrlhf.integrations")), f"{mod}: {text.strip()}"


def test_each_custom_op_is_defined_once():
    """Every ``fastrlhf::`` op is created through ``registry.Op`` (one fake, at most one autograd
    formula); no other module registers ops or autograd formulas itself, and no op is a
    per-backend mirror of another."""
    direct = []
    for mod, path in MODULES.items():
        if mod == "fastrlhf.ops.registry":
            continue
        src = path.read_text()
        if "register_autograd" in src:
            direct.append(f"{mod}: register_autograd")
        # the one exception: the token check op of ops.common (no autograd, no backend)
        if "torch.library.custom_op" in src and mod != "fastrlhf.ops.common":
            direct.append(f"{mod}: torch.library.custom_op")
    assert direct == [], direct
    ops = [name for name in dir(torch.ops.fastrlhf) if not name.startswith("_")]
    assert "token_logprobs" in ops and "fused_ppo_loss" in ops, ops
    assert not [n for n in ops if n.startswith("native")], ops


def _spy_dent(monkeypatch):
    import importlib
    lp = importlib.import_module("fastrlhf.ops.logprobs")
    seen = []
    real = lp.logprobs_grad

    def spy(logits, out, tokens, dlogp, dent, *rest):
        seen.append((dlogp is not None, dent is not None))
        return real(logits, out, tokens, dlogp, dent, *rest)

    monkeypatch.setattr(lp, "logprobs_grad", spy)
    return seen


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("inplace", [False, True])
def test_unused_entropy_gets_no_materialized_gradient(backend, inplace, monkeypatch):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("needs CUDA or the Triton interpreter")
    if backend == "native" and not fr.backend.native_available():
        pytest.skip("native extension unavailable")
    dev = "cpu" if backend == "native" else ("cuda" if torch.cuda.is_available() else "cpu")
    seen = _spy_dent(monkeypatch)
    x = torch.randn(2, 3, 17, device=dev, requires_grad=True)
    t = torch.randint(0, 17, (2, 3), device=dev)
    logits = x * 1.0
    fr.token_logprobs(logits, t, backend=backend, inplace_backward=inplace).sum().backward()
    lp, ent = fr.token_logprobs(x * 1.0, t, return_entropy=True, backend=backend,
                                inplace_backward=inplace)
    lp.sum().backward()        # the entropy output is unused
    ent2 = fr.token_entropy(x * 1.0, backend=backend)
    ent2.sum().backward()      # no log-probs at all
    assert seen == [(True, False), (True, False), (False, True)], seen


def test_fast_eager_records_an_autograd_node_only_when_autograd_would(monkeypatch):
    """``Op.__call__`` on plain tensors: through the ``autograd.Function`` when grad mode is on
    and an input requires grad, straight to the implementation otherwise (no node, and none of
    the Function's ~20 us); either way the same values."""
    if not fr.backend.native_available():
        pytest.skip("needs the native backend (the reference does not go through registry.Op)")
    from fastrlhf.ops import logprobs as lp
    op = lp._token_logprobs
    calls = []
    real_apply = op._function.apply
    monkeypatch.setattr(op._function, "apply",
                        lambda *a: calls.append(1) or real_apply(*a))
    backend = "native"
    x = torch.randn(3, 40, requires_grad=True)
    t = torch.randint(0, 40, (3,))
    want = fr.token_logprobs(x.detach().double(), t, backend="reference")
    with_grad = fr.token_logprobs(x, t, backend=backend)
    assert calls == [1] and with_grad.grad_fn is not None
    with torch.no_grad():
        no_grad = fr.token_logprobs(x, t, backend=backend)
    plain = fr.token_logprobs(x.detach(), t, backend=backend)
    assert calls == [1], "the Function ran although autograd records nothing"
    assert no_grad.grad_fn is None and not no_grad.requires_grad and plain.grad_fn is None
    for got in (with_grad, no_grad, plain):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    with_grad.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fast_eager_mutating_op_bumps_versions_and_defers_to_the_dispatcher_under_autograd(
        monkeypatch):
    """A mutating op with ``fast_eager`` calls its implementation directly only where autograd
    records nothing, and then bumps the version counters of what it wrote (as the dispatcher
    does: a tensor saved for some backward before it is then refused); with a mutated tensor
    that requires grad under grad mode it goes through the registered op."""
    from fastrlhf.ops import registry

    def _impl(x: torch.Tensor, y: torch.Tensor) -> None:
        x.data.add_(y)  # a raw write, as the kernels' (no version bump of its own)

    def _fake(x, y):
        return None

    op = registry.Op("test_fast_eager_mutating_", _impl, _fake, mutates_args=("x",),
                     fast_eager=True)
    via = []
    real = op.op
    monkeypatch.setattr(op, "op", lambda *a: via.append("dispatcher") or real(*a))
    x, y = torch.zeros(3), torch.ones(3)
    v = x._version
    op(x, y)
    assert via == [] and x._version > v and torch.equal(x, torch.ones(3))
    w = torch.zeros(3, requires_grad=True)
    saved = (w * 1.0)
    z = (saved * saved).sum()  # saves `saved`
    with torch.no_grad():
        op(saved, y)
    assert via == []
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()
    leaf = torch.zeros(3, requires_grad=True)
    v = leaf._version
    op(leaf, y)  # autograd could record this: the registered op, with its own checks
    assert via == ["dispatcher"] and leaf._version > v
