"""Swap-in / swap-out machinery shared by the trainer adapters (verl, OpenRLHF, TRL).

A :class:`Patcher` replaces an upstream object (function, class, method) by ours *everywhere it is
reachable by name*: in its defining module, in every already-imported module that bound it with
``from pkg.mod import name`` (found by scanning ``sys.modules`` for objects identical to the
original), in named registries (plain dicts the trainer looks things up in), and as a class
attribute for methods.  Every replacement is recorded so :meth:`Patcher.restore` can put the
originals back; a location that someone else re-patched in the meantime is left alone.

Modules imported *after* patching pick up our objects anyway (they read the patched module
attribute at import time).  What cannot be reached: references captured before patching inside
other objects (an instance attribute holding ``torch.compile(fn)``, a ``functools.partial``, a
default argument) -- hence "call ``patch()`` before building the trainer / workers".

Each adapter declares *what* it replaces in one :class:`PatchTable` (names swapped everywhere,
registry entries, class methods); :class:`Adapter` turns the table into the adapter's
``patch()`` / ``unpatch()`` / ``is_patched()``, so the three adapters share one skeleton.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

__all__ = ["Patcher", "UntestedVersionWarning", "PatchTable", "MethodSwap", "Adapter"]


class UntestedVersionWarning(UserWarning):
    """The installed trainer package is a version this adapter was not tested against."""


_MISSING = object()


class Patcher:
    """Records and undoes the replacements of one integration (one per adapter module)."""

    def __init__(self, integration: str, package: str, tested_versions: Tuple[str, ...],
                 install_hint: str):
        self.integration = integration          # "fastrlhf.integrations.verl"
        self.package = package                  # "verl"
        self.tested_versions = tested_versions  # ("0.9.1",)
        self.install_hint = install_hint
        # (container, key, original, replacement, is_attr): container is a dict (module namespace,
        # registry) when is_attr is False, else a class whose attribute ``key`` was set.
        self._records: List[Tuple[Any, Any, Any, Any, bool]] = []
        self._seen: set = set()

    # -- queries ----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return bool(self._records)

    def locations(self) -> List[str]:
        """Human-readable list of every place currently patched."""
        out = []
        for container, key, _, _, is_attr in self._records:
            if is_attr:
                out.append(f"{container.__module__}.{container.__qualname__}.{key}")
            else:
                name = container.get("__name__") if isinstance(container, dict) else None
                out.append(f"{name}.{key}" if isinstance(name, str) else f"<registry>[{key!r}]")
        return out

    # -- imports and versions ---------------------------------------------------------------------

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def require(self, module: str):
        """Import ``module`` of the upstream package, or raise an ImportError saying what to do."""
        try:
            return importlib.import_module(module)
        except ImportError as e:
            missing = getattr(e, "name", None)
            tested = " / ".join(self.tested_versions)
            if missing == self.package or (missing or "").startswith(self.package + "."):
                if self.version() is None:
                    raise ImportError(
                        f"{self.integration}.patch() needs {self.package} (tested with "
                        f"{self.package} {tested}), which is not installed: {self.install_hint}"
                    ) from e
            raise ImportError(
                f"{self.integration}.patch(): {self.package} {self.version() or '?'} is installed "
                f"but {module} failed to import ({type(e).__name__}: {e}). Install what it "
                f"needs: {self.install_hint}") from e

    def check_version(self) -> None:
        v = self.version()
        if v is not None and v not in self.tested_versions:
            warnings.warn(
                f"{self.integration}: {self.package} {v} is installed, but this adapter was tested "
                f"with {self.package} {' / '.join(self.tested_versions)} only. The replacements "
                f"reproduce the tested version's formulas; if {self.package} changed them, numbers "
                f"will differ. Compare a few steps with and without patch() before relying on it.",
                UntestedVersionWarning, stacklevel=3)

    # -- replacing --------------------------------------------------------------------------------

    def _record(self, container, key, original, replacement, is_attr: bool) -> None:
        ident = (id(container), key, is_attr)
        if ident in self._seen:
            return
        self._seen.add(ident)
        self._records.append((container, key, original, replacement, is_attr))

    def swap_everywhere(self, original: Any, replacement: Any) -> int:
        """Replace every module-level binding of ``original`` (by identity) in ``sys.modules``.

        Reads each module's ``__dict__`` directly, so lazy modules (transformers, trl) are never
        triggered into importing anything.  Returns the number of bindings replaced.
        """
        n = 0
        for mod in list(sys.modules.values()):
            ns = getattr(mod, "__dict__", None)
            if not isinstance(ns, dict):
                continue
            for key, value in list(ns.items()):
                if value is original:
                    ns[key] = replacement
                    self._record(ns, key, original, replacement, False)
                    n += 1
        return n

    def swap_in_dict(self, registry: Dict, key, original: Any, replacement: Any) -> bool:
        """Replace ``registry[key]`` if it still holds ``original``."""
        if registry.get(key, _MISSING) is original:
            registry[key] = replacement
            self._record(registry, key, original, replacement, False)
            return True
        return False

    def swap_attr(self, cls: type, name: str, replacement: Any) -> bool:
        """Replace the class attribute ``cls.name`` (a method defined on ``cls`` itself)."""
        original = cls.__dict__.get(name, _MISSING)
        if original is _MISSING or original is replacement:
            return False
        setattr(cls, name, replacement)
        self._record(cls, name, original, replacement, True)
        return True

    def original_attr(self, cls: type, name: str):
        """The original of a class attribute we replaced (or the current one if we did not)."""
        for container, key, original, _, is_attr in self._records:
            if is_attr and container is cls and key == name:
                return original
        return cls.__dict__[name]

    def restore(self) -> int:
        """Put every original back (newest first); returns how many locations were restored."""
        n = 0
        for container, key, original, replacement, is_attr in reversed(self._records):
            if is_attr:
                if container.__dict__.get(key, _MISSING) is replacement:
                    setattr(container, key, original)
                    n += 1
            elif container.get(key, _MISSING) is replacement:
                container[key] = original
                n += 1
        self._records.clear()
        self._seen.clear()
        return n


def swap_all(patcher: Patcher, pairs: List[Tuple[Any, Any]]) -> None:
    """``swap_everywhere`` for each ``(original, replacement)`` pair (skipping replaced ones)."""
    for original, replacement in pairs:
        if original is not replacement:
            patcher.swap_everywhere(original, replacement)


def upstream(module, name: str, ours: Callable, patcher: Patcher):
    """The upstream object ``module.name`` -- or, if we already patched it, the original."""
    value = module.__dict__[name]
    if value is ours:
        for container, key, original, _, is_attr in patcher._records:
            if not is_attr and container is module.__dict__ and key == name:
                return original
    return value


@dataclass(frozen=True)
class MethodSwap:
    """Replace ``module.cls.attr`` by the adapter's object named ``ours``.  ``optional``: when the
    module cannot be imported, warn (``reason`` says what stays unpatched) instead of raising."""
    module: str
    cls: str
    attr: str
    ours: str
    optional: bool = False
    reason: str = ""


@dataclass(frozen=True)
class PatchTable:
    """What one adapter replaces in its trainer package.

    ``swaps``: upstream module -> names that the adapter defines under the same names; each is
    replaced in its module and in every imported module that bound it.  ``registries``:
    ``(module, registry attribute, {key: name})``, dict entries that held the upstream object of
    ``name`` (from ``swaps``).  ``methods``: class attributes to replace."""
    swaps: Mapping[str, Tuple[str, ...]]
    registries: Tuple[Tuple[str, str, Mapping[str, str]], ...] = ()
    methods: Tuple[MethodSwap, ...] = field(default_factory=tuple)


class Adapter:
    """``patch`` / ``unpatch`` / ``is_patched`` of one adapter, driven by its :class:`PatchTable`.

    ``ours``: the adapter module's namespace (its replacements, by upstream name).
    ``on_patch``: optional hook called with ``{module name: module}`` of every imported upstream
    module after the swaps (e.g. to remember a module the replacements call back into)."""

    def __init__(self, patcher: Patcher, table: PatchTable, ours: Mapping[str, Any],
                 on_patch: Optional[Callable[[Dict[str, Any]], None]] = None):
        self.patcher = patcher
        self.table = table
        self.ours = ours
        self.on_patch = on_patch

    def patch(self) -> list:
        p, t = self.patcher, self.table
        # Every module that must import does so before anything is replaced.
        required = list(t.swaps) + [m.module for m in t.methods if not m.optional]
        mods = {name: p.require(name) for name in dict.fromkeys(required)}
        p.check_version()
        original = {}
        for mod_name, names in t.swaps.items():
            for n in names:
                original[n] = upstream(mods[mod_name], n, self.ours[n], p)
        swap_all(p, [(original[n], self.ours[n]) for n in original])
        for mod_name, attr, entries in t.registries:
            registry = getattr(mods[mod_name], attr)
            for key, name in entries.items():
                p.swap_in_dict(registry, key, original[name], self.ours[name])
        for m in t.methods:
            try:
                mod = mods[m.module] if m.module in mods else p.require(m.module)
            except ImportError as e:
                if not m.optional:
                    raise
                warnings.warn(f"{p.integration}: {m.reason or m.cls + '.' + m.attr} not patched: "
                              f"{e}", RuntimeWarning, stacklevel=3)
                continue
            mods[m.module] = mod
            p.swap_attr(getattr(mod, m.cls), m.attr, self.ours[m.ours])
        if self.on_patch is not None:
            self.on_patch(mods)
        return p.locations()

    def unpatch(self) -> int:
        return self.patcher.restore()

    def is_patched(self) -> bool:
        return self.patcher.active
