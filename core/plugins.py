"""The plugin manager: loads entry points one at a time and builds the registry of named objects.

Loading order (pytest and tox do the same):

1. every entry point of the ``sft`` group, each in its own ``try`` so one broken plugin is
   recorded and the rest still load (``SFT_DISABLE_PLUGIN_AUTOLOAD=1`` keeps only the
   bundled ones, which ``sft-forge`` declares in the same group);
2. ``check_pending()``: a hookimpl with a misspelled hook name fails its plugin;
3. every ``register_*`` hook, called plugin by plugin so a duplicate name can name both.

The bundled plugins (distribution ``sft-forge``) come first in both steps, whatever the order
of ``sys.path`` or a hook's ``tryfirst``/``trylast``: a name of sft's own always stays sft's.
A third party's object registered under such a name is left out (its other objects stay),
with a notice and a line in ``sft plugins`` naming both plugins; two third-party plugins
that register one name are an error that disables the second.

``SFT_STRICT_PLUGINS=1`` turns any recorded failure into an error.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownPluginError
from .interfaces import KINDS
from .notices import notice

__all__ = [
    "ENTRY_POINT_GROUP",
    "BUNDLED_DISTRIBUTION",
    "PluginInfo",
    "PluginManager",
    "get_plugin_manager",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "sft"
BUNDLED_DISTRIBUTION = "sft-forge"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin, as ``sft plugins`` shows it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    #: kind -> registered names
    provides: dict[str, list[str]] = field(default_factory=dict)
    #: its registrations left out because sft's own plugin has the name (the rest of it works)
    clashes: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return "ok" if self.error is None else "failed"

    @property
    def kinds(self) -> list[str]:
        return sorted(self.provides)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kinds": self.kinds,
            "provides": {k: sorted(v) for k, v in sorted(self.provides.items())},
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "clashes": list(self.clashes),
        }


def _short_error(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class PluginManager:
    """A pluggy manager plus the registry of named objects per kind.

    Build one with :func:`get_plugin_manager` (the process-wide one, loaded from entry
    points) or directly (``PluginManager()``, empty, for tests), then ``register`` plugin
    objects or modules and read ``registry(kind)``.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("sft")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self._registry: dict[str, dict[str, Any]] | None = None
        #: (kind, name) -> plugin name that registered it
        self._owner: dict[tuple[str, str], str] = {}
        self._noticed: set[str] = set()  # each clash is told once, though the registry is rebuilt

    # -- loading -----------------------------------------------------------------------
    def register(self, plugin: object, name: str | None = None, *, distribution: str | None = None,
                 version: str | None = None) -> str:
        """Register a plugin module or object. Invalidates the registry so it is rebuilt."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        registered = self.pm.register(plugin, name=name)
        self.plugins[registered] = PluginInfo(registered, distribution, version)
        self._registry = None
        return registered

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._registry = None

    def _fail(self, name: str, error: str, distribution: str | None = None, version: str | None = None) -> None:
        info = self.plugins.get(name) or PluginInfo(name, distribution, version)
        info.error = error
        self.plugins[name] = info
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self._registry = None

    def load_entry_points(self, entry_points: Iterable[metadata.EntryPoint] | None = None,
                          bundled_only: bool | None = None) -> None:
        """Load each entry point of the ``sft`` group on its own; record failures instead of raising."""
        if bundled_only is None:
            bundled_only = _env_flag("SFT_DISABLE_PLUGIN_AUTOLOAD")
        if entry_points is None:
            entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
        # sft's own first, so that an entry point name of sft's is never taken by a third party.
        for ep in sorted(entry_points, key=lambda ep: not _is_bundled(ep.dist.name if ep.dist else None)):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if bundled_only and not _is_bundled(dist):
                continue
            if ep.name in self.plugins:
                other = self.plugins[ep.name].distribution
                self.plugins.setdefault(f"{ep.name} ({dist})", PluginInfo(ep.name, dist, version)).error = (
                    f"PluginError: entry point name '{ep.name}' is also used by distribution '{other}'")
                continue
            try:
                module = ep.load()
                self.register(module, ep.name, distribution=dist, version=version)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
                self._fail(ep.name, _short_error(exc), dist, version)
        self.check_pending()

    def check_pending(self) -> None:
        """Fail every plugin that implements a hook with no spec (usually a misspelled name)."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin)
                self._fail(name, f"PluginValidationError: {exc}")

    # -- registry ----------------------------------------------------------------------
    def _build_registry(self) -> dict[str, dict[str, Any]]:
        registry: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        self._owner = {}
        for info in self.plugins.values():
            info.provides, info.clashes = {}, []
        for kind, (hook_name, interface, _section) in KINDS.items():
            hook = getattr(self.pm.hook, hook_name)
            # Call implementations one plugin at a time so a duplicate can name both owners
            # and a plugin whose hook raises fails alone. The bundled plugins go first, so they
            # keep their names; pluggy's own order (registration, tryfirst/trylast) only ranks the rest.
            for impl in sorted(hook.get_hookimpls(), key=lambda impl: not self.is_bundled(impl.plugin_name)):
                plugin_name = impl.plugin_name

                def register(obj: Any, _kind=kind, _plugin=plugin_name, _iface=interface) -> None:
                    # Anything wrong here disables this plugin alone (_Refused), never the others.
                    name = getattr(obj, "name", None)
                    if not isinstance(name, str) or not name:
                        raise _Refused(f"registered a {_kind} without a name: {obj!r}")
                    if not isinstance(obj, _iface):
                        raise _Refused(f"registered {_kind} '{name}' that is not a {_iface.__name__}")
                    _check_options(getattr(obj, "options", None), f"{_kind} '{name}'")
                    owner = self._owner.get((_kind, name))
                    if owner is not None and self.is_bundled(owner) and not self.is_bundled(_plugin):
                        self._clash(_kind, name, owner, _plugin)
                        return
                    if owner is not None:
                        raise _Refused(f"{_kind} '{name}' is registered by both plugin {self._named(owner)} and "
                                       f"plugin {self._named(_plugin)}; '{owner}' keeps it")
                    registry[_kind][name] = obj
                    self._owner[(_kind, name)] = _plugin
                    info = self.plugins.setdefault(_plugin, PluginInfo(_plugin))
                    info.provides.setdefault(_kind, []).append(name)

                try:
                    impl.function(**{arg: register for arg in impl.argnames})
                except Exception as exc:  # noqa: BLE001 - one plugin's mistake must not take the CLI down
                    why = str(exc) if isinstance(exc, _Refused) else f"{hook_name} raised {_short_error(exc)}"
                    self._fail(plugin_name, f"PluginError: {why}" if isinstance(exc, _Refused) else why)
                    for key in [k for k, owner in self._owner.items() if owner == plugin_name]:
                        registry[key[0]].pop(key[1], None)
                        del self._owner[key]
        return registry

    def is_bundled(self, plugin_name: str) -> bool:
        info = self.plugins.get(plugin_name)
        return info is not None and _is_bundled(info.distribution)

    def _named(self, plugin_name: str) -> str:
        info = self.plugins.get(plugin_name)
        dist = info.distribution if info is not None else None
        return f"'{plugin_name}'" + (f" ({dist}{' ' + info.version if info.version else ''})" if dist else "")

    def _clash(self, kind: str, name: str, owner: str, plugin_name: str) -> None:
        """``plugin_name`` registers a name of sft's own: that one object is left out, the plugin stays."""
        what = f"{kind.replace('_', ' ')} '{name}'"
        line = (f"{what} of plugin {self._named(plugin_name)} is left out: the name is sft's own "
                f"(plugin {self._named(owner)} keeps it); rename it in that plugin")
        self.plugins.setdefault(plugin_name, PluginInfo(plugin_name)).clashes.append(line)
        if line not in self._noticed:
            self._noticed.add(line)
            notice(line)

    def disable(self, plugin_name: str, reason: str) -> None:
        """Leave ``plugin_name`` out, recording ``reason`` for ``sft plugins`` (e.g. its options clash with a core key)."""
        self._fail(plugin_name, f"PluginError: {reason}")

    def registry(self, kind: str) -> dict[str, Any]:
        """Name -> registered object for one kind (``dataset_format``, ``chat_template``, ...)."""
        if self._registry is None:
            self._registry = self._build_registry()
        return self._registry[kind]

    def get(self, kind: str, name: str, key: str = "") -> Any:
        """The registered object, or an :class:`UnknownPluginError` with a did-you-mean."""
        registry = self.registry(kind)
        if name not in registry:
            raise UnknownPluginError(kind.replace("_", " "), name, list(registry), key or kind)
        return registry[name]

    def owner(self, kind: str, name: str) -> str | None:
        """The plugin that registered ``name`` of ``kind``."""
        self.registry(kind)
        return self._owner.get((kind, name))

    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error is not None]

    def listing(self) -> list[PluginInfo]:
        """Every plugin, loaded or failed, with what it provides. Builds the registry."""
        for kind in KINDS:
            self.registry(kind)
        return sorted(self.plugins.values(), key=lambda p: (p.distribution != BUNDLED_DISTRIBUTION, p.name))

    def raise_if_strict(self) -> None:
        if _env_flag("SFT_STRICT_PLUGINS") and self.failures():
            raise PluginError("plugins failed to load (SFT_STRICT_PLUGINS=1): " + "; ".join(
                f"{p.name}: {p.error}" for p in self.failures()))


class _Refused(Exception):
    """A registration that disables its plugin (a clash, a bad object or options)."""


def _check_options(options: Any, what: str) -> None:
    """A plugin's ``options`` must be a dataclass type that OmegaConf can build into a config node."""
    if options is None:
        return
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise _Refused(f"{what}: options must be a dataclass type, got {options!r}")
    from omegaconf import OmegaConf

    try:
        OmegaConf.structured(options)
    except Exception as exc:  # noqa: BLE001 - OmegaConf raises several types for an unsupported field
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Refused(f"{what}: OmegaConf cannot build its options {options.__name__}: {first}") from None


def _canonical(name: str | None) -> str:
    return (name or "").lower().replace("_", "-").replace(".", "-")


def _is_bundled(distribution: str | None) -> bool:
    return _canonical(distribution) == _canonical(BUNDLED_DISTRIBUTION)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loaded from entry points on first use."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_entry_points()
        manager.raise_if_strict()
        _manager = manager
    return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests use this after installing or removing plugins)."""
    global _manager
    _manager = None
