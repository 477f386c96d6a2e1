"""Maps the repository root (core/, plugins/) onto the ``plugrl`` namespace; metadata lives in pyproject.toml."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithoutSetup(build_py):
    # The root package is "." so setuptools would also ship setup.py as plugrl/setup.py.
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "plugrl" and m[1] == "setup")]


subpackages = find_packages(include=["core", "core.*", "plugins", "plugins.*"])
setup(
    package_dir={"plugrl": "."},
    packages=["plugrl"] + [f"plugrl.{p}" for p in subpackages],
    package_data={"plugrl.plugins.backends.torch": ["data/*.jsonl"], "plugrl.plugins.backends.sglang": ["sglang_names.json"]},
    cmdclass={"build_py": BuildPyWithoutSetup},
)
