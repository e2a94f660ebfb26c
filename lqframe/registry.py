"""The component registry, fed by pluggy plugins found through the ``lqframe`` entry-point group.

Built-in methods are entry points of the ``lqframe`` distribution itself, so they load exactly
like third-party ones. A plugin that fails to import or to register is recorded (see
:attr:`Registry.failures` and ``lqframe plugins``) instead of breaking the others.
Set ``LQFRAME_BLOCK_PLUGINS`` to a comma-separated list of entry-point or distribution names to
keep them from loading (like pytest's ``-p no:NAME``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import re
import threading
import traceback
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from lqframe import hookspecs
from lqframe.errors import OptionError, PluginError, UnknownComponentError
from lqframe.interfaces import BudgetAllocator, Component, ErrorReconstructor, LossObjective, Quantizer
from lqframe.stats import BUILTIN_STATISTICS, StatisticKind

__all__ = ["Registry", "ComponentInfo", "PluginFailure", "KINDS", "BLOCK_ENV", "registry"]

BLOCK_ENV = "LQFRAME_BLOCK_PLUGINS"

KINDS: dict[str, type] = {
    "quantizer": Quantizer,
    "reconstructor": ErrorReconstructor,
    "allocator": BudgetAllocator,
    "objective": LossObjective,
}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@attrs.frozen
class ComponentInfo:
    kind: str
    name: str
    cls: type = attrs.field(repr=False)
    plugin: str
    distribution: str | None
    version: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
        }


@attrs.frozen
class PluginFailure:
    plugin: str
    distribution: str | None
    version: str | None
    stage: str  # "import" or "register"
    error: str
    details: str = attrs.field(repr=False, default="")

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "failed",
            "name": self.plugin,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
            "stage": self.stage,
            "error": self.error,
        }


def option_names(cls: type) -> list[str]:
    """The keyword options a component class accepts."""
    if attrs.has(cls):
        return [f.alias or f.name for f in attrs.fields(cls) if f.init]
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def option_defaults(cls: type) -> dict[str, Any]:
    """Option name → default value (``attrs.NOTHING``-free: required options map to None)."""
    out: dict[str, Any] = {}
    if attrs.has(cls):
        for f in attrs.fields(cls):
            if not f.init:
                continue
            d = f.default
            if isinstance(d, attrs.Factory):  # type: ignore[arg-type]
                d = d.factory() if not d.takes_self else None
            out[f.alias or f.name] = None if d is attrs.NOTHING else d
        return out
    for p in inspect.signature(cls).parameters.values():
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            out[p.name] = None if p.default is p.empty else p.default
    return out


def _suggest(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _normalise(name: str) -> str:
    """Distribution names compare as pip does: case-insensitive, '-', '_' and '.' alike."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocked_names() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {_normalise(part.strip()) for part in raw.split(",") if part.strip()}


class Registry:
    """Components by kind and name, with the plugin and distribution that provided each."""

    def __init__(self, load_entry_points: bool = True):
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._components: dict[tuple[str, str], ComponentInfo] = {}
        self._failures: list[PluginFailure] = []
        self._blocked: list[str] = []
        self._context: tuple[str, str | None, str | None] | None = None
        self._statistics: dict[str, StatisticKind] = {k.name: k for k in BUILTIN_STATISTICS}
        self._statistic_owner: dict[str, str] = {}
        if load_entry_points:
            self.load_entry_points()

    # ------------------------------------------------------------------ registration API (for plugins)
    def add_quantizer(self, name: str, cls: type[Quantizer]) -> None:
        self.add("quantizer", name, cls)

    def add_reconstructor(self, name: str, cls: type[ErrorReconstructor]) -> None:
        self.add("reconstructor", name, cls)

    def add_allocator(self, name: str, cls: type[BudgetAllocator]) -> None:
        self.add("allocator", name, cls)

    def add_objective(self, name: str, cls: type[LossObjective]) -> None:
        self.add("objective", name, cls)

    def add_statistic(self, kind: StatisticKind) -> None:
        """A statistic kind components may list in ``needs`` (see :mod:`lqframe.stats`)."""
        plugin = (self._context or ("<direct>",))[0]
        if not isinstance(kind, StatisticKind):
            raise PluginError(f"plugin {plugin!r}: add_statistic takes a lqframe.stats.StatisticKind, got {kind!r}")
        if not _NAME_RE.match(kind.name):
            raise PluginError(f"plugin {plugin!r}: statistic name {kind.name!r} must be lower-case letters, digits, "
                              "'-', '_' or '.'")
        if kind.name in self._statistics:
            raise PluginError(f"plugin {plugin!r}: statistic {kind.name!r} is already defined")
        self._statistics[kind.name] = kind
        self._statistic_owner[kind.name] = plugin

    def statistics(self) -> dict[str, StatisticKind]:
        """Every known statistic kind by name (built-in and from plugins)."""
        return dict(self._statistics)

    def add(self, kind: str, name: str, cls: type) -> None:
        plugin, dist, version = self._context or ("<direct>", None, None)
        if kind not in KINDS:
            raise PluginError(f"plugin {plugin!r}: unknown component kind {kind!r}; kinds: {sorted(KINDS)}")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin {plugin!r}: {kind} name {name!r} must be lower-case letters, digits, '-', '_' or '.'"
            )
        if not (inspect.isclass(cls) and issubclass(cls, KINDS[kind])):
            raise PluginError(
                f"plugin {plugin!r}: {kind} {name!r} must be a subclass of lqframe.{KINDS[kind].__name__}, "
                f"got {cls!r}"
            )
        if inspect.isabstract(cls):
            missing = sorted(getattr(cls, "__abstractmethods__", ()))
            raise PluginError(f"plugin {plugin!r}: {kind} {name!r} does not implement {missing}")
        existing = self._components.get((kind, name))
        if existing is not None:
            raise PluginError(
                f"plugin {plugin!r}: {kind} {name!r} is already registered by plugin {existing.plugin!r}"
                f" ({existing.distribution or 'no distribution'})"
            )
        self._components[(kind, name)] = ComponentInfo(kind, name, cls, plugin, dist, version)

    # ------------------------------------------------------------------ loading
    def load_entry_points(self) -> None:
        blocked = _blocked_names()
        eps = sorted(importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name)
        for ep in eps:
            dist = ep.dist.metadata["Name"] if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if _normalise(ep.name) in blocked or (dist is not None and _normalise(dist) in blocked):
                self._blocked.append(ep.name)
                continue
            if self._pm.has_plugin(ep.name):
                self._fail(ep.name, dist, version, "import",
                           f"entry point name {ep.name!r} is used by another plugin already loaded")
                continue
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported, not swallowed
                self._fail(ep.name, dist, version, "import", f"{type(exc).__name__}: {exc}",
                           traceback.format_exc())
                continue
            self.register_plugin(module, ep.name, distribution=dist, version=version)

    def register_plugin(
        self, plugin: object, name: str, distribution: str | None = None, version: str | None = None
    ) -> bool:
        """Register a plugin object (module or instance with a ``lqframe_register`` hookimpl) and run
        its registration. Returns False (and records a failure) if it could not be registered."""
        if name in self._blocked or _normalise(name) in _blocked_names():
            return False
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001
            self._fail(name, distribution, version, "register", f"{type(exc).__name__}: {exc}",
                       traceback.format_exc())
            return False
        impls = [i for i in self._pm.hook.lqframe_register.get_hookimpls() if i.plugin is plugin]
        before = set(self._components)
        stats_before = set(self._statistics)
        self._context = (name, distribution, version)
        try:
            for impl in impls:
                impl.function(registry=self)
        except Exception as exc:  # noqa: BLE001
            for key in set(self._components) - before:
                del self._components[key]
            for key in set(self._statistics) - stats_before:
                del self._statistics[key]
            self._pm.unregister(plugin)
            self._fail(name, distribution, version, "register", f"{type(exc).__name__}: {exc}",
                       traceback.format_exc())
            return False
        finally:
            self._context = None
        return True

    def unregister_plugin(self, name: str) -> None:
        for key, info in list(self._components.items()):
            if info.plugin == name:
                del self._components[key]
        for key, owner in list(self._statistic_owner.items()):
            if owner == name:
                del self._statistics[key], self._statistic_owner[key]
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)

    def _fail(self, plugin, dist, version, stage, error, details="") -> None:
        self._failures.append(PluginFailure(plugin, dist, version, stage, error, details))

    # ------------------------------------------------------------------ queries
    @property
    def failures(self) -> list[PluginFailure]:
        return list(self._failures)

    @property
    def blocked(self) -> list[str]:
        return list(self._blocked)

    def names(self, kind: str) -> list[str]:
        self._check_kind(kind)
        return sorted(n for k, n in self._components if k == kind)

    def components(self, kind: str | None = None) -> list[ComponentInfo]:
        infos = [i for (k, _), i in self._components.items() if kind is None or k == kind]
        order = list(KINDS)
        return sorted(infos, key=lambda i: (order.index(i.kind), i.name))

    def info(self, kind: str, name: str) -> ComponentInfo:
        self._check_kind(kind)
        try:
            return self._components[(kind, name)]
        except KeyError:
            known = self.names(kind)
            failed = [f for f in self._failures if f.plugin == name]
            extra = f" (plugin {name!r} failed to load: {failed[0].error})" if failed else ""
            raise UnknownComponentError(
                f"unknown {kind} {name!r}{_suggest(name, known)}{extra}; known {kind}s: "
                f"{', '.join(known) or 'none'}"
            ) from None

    def get(self, kind: str, name: str) -> type:
        return self.info(kind, name).cls

    def create(self, kind: str, name: str, **options: Any) -> Component:
        """Instantiate component ``name`` of ``kind`` with validated options."""
        cls = self.get(kind, name)
        allowed = option_names(cls)
        for key in options:
            if key not in allowed:
                raise OptionError(
                    f"{kind} {name!r} has no option {key!r}{_suggest(key, allowed)}; "
                    f"its options are: {', '.join(allowed) or 'none'}"
                )
        try:
            return cls(**options)
        except (TypeError, ValueError) as exc:
            raise OptionError(f"{kind} {name!r}: {exc}") from exc

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r}{_suggest(kind, KINDS)}; kinds: "
                                        f"{', '.join(KINDS)}")


_REGISTRY: Registry | None = None
_LOCK = threading.Lock()


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loading entry points on first use (or again with ``reload``)."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None or reload:
            _REGISTRY = Registry()
        return _REGISTRY
