"""The pack's version (kept equal to pyproject.toml's [project].version; a unit test checks)."""

__version__ = "0.1.0"
