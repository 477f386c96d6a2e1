"""Calling ``plugrl_configure`` (historic) once per plugin manager: on the driver from the config check
(``--dry-run`` included, so a plugin's own validation runs before any actor starts), and from the loop
when nothing checked the config first. A ``ValueError`` a plugin raises becomes a config problem."""

from __future__ import annotations

_DONE = "_plugrl_configured"  # set on the pluggy PluginManager once the historic call is made


def configure_plugins(plugin_set, args) -> list[str]:
    """Run ``plugrl_configure(config=args)`` unless this manager already did; the problems it raised."""
    pm = plugin_set.pm
    if getattr(pm, _DONE, False):
        return []
    setattr(pm, _DONE, True)
    try:
        pm.hook.plugrl_configure.call_historic(kwargs={"config": args})
    except ValueError as exc:
        setattr(pm, _DONE, False)  # the run stops here; a fixed config may be checked again
        return [f"plugrl_configure: {exc}"]
    return []
