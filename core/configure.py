"""Calling ``plugrl_configure`` once per plugin manager: on the driver from the config check
(``--dry-run`` included, so a plugin's own validation runs before any actor starts), and from the loop
when nothing checked the config first. Each plugin is called on its own, so whatever one raises becomes
a config problem naming that plugin (a ``ValueError`` is the documented way; anything else is a bug in
the plugin, reported the same way instead of as a traceback)."""

from __future__ import annotations

_DONE = "_plugrl_configured"  # set on the pluggy PluginManager once every plugin was configured


def configure_plugins(plugin_set, args) -> list[str]:
    """Run ``plugrl_configure(config=args)`` on every plugin unless this manager already did; the problems
    they raised, one line each."""
    pm = plugin_set.pm
    if getattr(pm, _DONE, False):
        return []
    problems = []
    for impl in reversed(pm.hook.plugrl_configure.get_hookimpls()):  # pluggy's order: last registered first
        try:
            impl.function(**{name: args for name in impl.argnames})
        except ValueError as exc:
            problems.append(f"plugrl_configure of plugin '{impl.plugin_name}': {exc}")
        except Exception as exc:
            problems.append(f"plugrl_configure of plugin '{impl.plugin_name}' raised {type(exc).__name__}: {exc}")
    setattr(pm, _DONE, not problems)  # after problems the run stops; a fixed config may be checked again
    return problems
