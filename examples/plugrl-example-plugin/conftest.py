# plugrl's fixtures (plugin_set, make_samples) are opt-in: enable them for this package's tests.
pytest_plugins = ["plugrl.core.testing"]
