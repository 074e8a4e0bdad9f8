"""A run folder that cannot hold the run fails in one sentence, before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.loop import RunFolderError, check_run_folder

ROOT = Path(__file__).parents[2]


def test_an_unwritable_out_ends_the_command_in_one_sentence_before_any_model_loads(tmp_path):
    # The model does not exist: had it been loaded first, the error would be about the model.
    cmd = [sys.executable, "-m", "distill.jbond", "--out", "/proc/forbidden", "--model", str(tmp_path / "no-model")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot create the run folder /proc/forbidden")
    assert last.endswith("choose a writable --out")
    assert "no-model" not in run.stderr


def test_a_file_in_the_way_is_named(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(RunFolderError, match=r"cannot create the run folder .*taken/run"):
        check_run_folder(tmp_path / "taken" / "run")


def test_a_disk_without_room_is_refused_with_what_is_free(tmp_path):
    check_run_folder(tmp_path / "run")  # creatable, writable, and this disk has 100 MiB
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())  # the probe left nothing
    with pytest.raises(RunFolderError, match=r"MiB free, less than the \d+ MiB a run needs"):
        check_run_folder(tmp_path / "run", min_free_bytes=2**62)
