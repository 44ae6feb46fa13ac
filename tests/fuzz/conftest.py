"""Fuzz tier: ComfyUI imported in-process (the stack loader lives in the bridge), hypothesis settings from the
command line (``--fuzz-cases``, ``--fuzz-seed``; a fixed, derandomized run by default, as CI needs)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from lora_loom.comfy_env import find_comfyui, import_comfy

BASE_DIR = Path(tempfile.mkdtemp(prefix="loom-fuzz-"))
atexit.register(shutil.rmtree, BASE_DIR, True)
import_comfy(find_comfyui(os.environ.get("COMFYUI_PATH") or str(Path(__file__).parents[2] / ".loom" / "comfyui")),
             cpu=True, base_directory=str(BASE_DIR))


@dataclass(frozen=True)
class FuzzBudget:
    """How many generated files each fuzz test runs, and the hypothesis settings for it."""

    cases: int
    seed: int | None

    def settings(self, examples: int) -> settings:
        return settings(max_examples=max(1, examples), derandomize=self.seed is None, database=None, deadline=None,
                        print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                HealthCheck.large_base_example])


@pytest.fixture(scope="session")
def fuzz_budget(pytestconfig: pytest.Config) -> FuzzBudget:
    return FuzzBudget(cases=pytestconfig.getoption("--fuzz-cases"), seed=pytestconfig.getoption("--fuzz-seed"))
