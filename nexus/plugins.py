"""The one plugin manager: core defaults plus every plugin of the ``nexus`` entry-point group.

First-party families (``families.gpt_oss``, ...) are declared in the project's own
``pyproject.toml`` under ``[project.entry-points.nexus]`` and are found exactly as a third
party's plugin is. Environment switches:

- ``NEXUS_LOAD_PLUGINS=a,b``: load only these entry points (by entry-point or distribution name);
  an empty value loads none.
- ``NEXUS_TRACE_PLUGINS=1``: log every hook call with its arguments and result.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

import pluggy

from nexus import hookspecs
from nexus.errors import NexusError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nexus"
# Core behaviour every family inherits unless it overrides a hook; registered last so that any
# family's implementation runs first.
DEFAULT_PLUGINS = ("nexus.defaults",)

_pm: pluggy.PluginManager | None = None


def _wanted(ep: importlib.metadata.EntryPoint, only: set[str] | None) -> bool:
    if only is None:
        return True
    dist = getattr(ep, "dist", None)
    return ep.name in only or (dist is not None and dist.name in only)


def load_entry_point_plugins(pm: pluggy.PluginManager) -> None:
    """Register every plugin of the ``nexus`` entry-point group on ``pm``.

    Honours ``NEXUS_LOAD_PLUGINS``. A plugin that fails to import raises :class:`NexusError`
    naming it and its distribution.
    """
    env = os.environ.get("NEXUS_LOAD_PLUGINS")
    only = None if env is None else {s.strip() for s in env.split(",") if s.strip()}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP or not _wanted(ep, only):
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - re-raised with the plugin named
                raise NexusError(
                    f"plugin {ep.name!r} from distribution {dist.name!r} failed to import: {exc}. "
                    f"Reinstall it or exclude it with NEXUS_LOAD_PLUGINS."
                ) from exc
            pm.register(plugin, name=ep.name)
            pm._nexus_dists[ep.name] = (dist.name, dist.version)  # type: ignore[attr-defined]


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name, hook_impls, kwargs):
        log.info("hook %s(%s) -> %s", hook_name, kwargs, [i.plugin_name for i in hook_impls])

    def after(outcome, hook_name, hook_impls, kwargs):
        log.info("hook %s returned %r", hook_name, outcome.get_result() if not outcome.exception else outcome.exception)

    pm.add_hookcall_monitoring(before, after)


def check_pending(pm: pluggy.PluginManager) -> None:
    """Fail with the hook's name when a plugin implements a hook that does not exist (a typo)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise NexusError(f"{exc}. Check the spelling against nexus/hookspecs.py.") from exc


def build_plugin_manager(load_entry_points: bool = True) -> pluggy.PluginManager:
    """Return a new plugin manager with the specs, the entry-point plugins and the core defaults."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm._nexus_dists = {}  # type: ignore[attr-defined]  # plugin name -> (distribution, version)
    if load_entry_points:
        load_entry_point_plugins(pm)
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    check_pending(pm)
    if os.environ.get("NEXUS_TRACE_PLUGINS"):
        _trace(pm)
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    if _pm is None:
        _pm = build_plugin_manager()
    return _pm


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; after changing ``NEXUS_LOAD_PLUGINS``)."""
    global _pm
    _pm = None


def plugin_distribution(pm: pluggy.PluginManager, name: str) -> tuple[str, str]:
    """``(distribution, version)`` that provides plugin ``name``; the core for defaults."""
    from nexus import __version__

    return getattr(pm, "_nexus_dists", {}).get(name, ("nexus-moe", __version__))
