"""Only the package list is computed here; everything else is in pyproject.toml. The repository root is the
package ``lora_loom`` (``package-dir`` there), and every folder below it with an ``__init__.py`` is one of its
subpackages, so a new subpackage ships without editing a list."""
from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

NOT_SHIPPED = ("tests", "tests.*", "dev", "dev.*", "build", "build.*")


class BuildPy(build_py):
    """The root folder is the package, so this file would ship as the module ``lora_loom.setup``; it stays out."""

    def find_package_modules(self, package, package_dir):
        return [m for m in super().find_package_modules(package, package_dir) if m[:2] != ("lora_loom", "setup")]


setup(packages=["lora_loom", *(f"lora_loom.{name}" for name in find_packages(exclude=NOT_SHIPPED))],
      cmdclass={"build_py": BuildPy})
