"""What importing the packages does to the process before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", ["bonbench", "distill"])
def test_importing_a_package_sets_a_passive_openmp_wait_policy_before_torch_and_keeps_a_users_choice(package):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = f"import os, sys, {package}; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"

    def run(**extra: str) -> str:
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, **extra}, capture_output=True,
                              text=True, check=True)
        return done.stdout.strip()

    assert run() == "PASSIVE False"  # set, and torch not yet loaded: OpenMP reads it when torch loads
    assert run(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"
