"""A plugin that cannot be imported: plugrl must report it and keep every other plugin working."""

raise ImportError("plugrl_broken_plugin needs the 'not-installed-dependency' package")
