"""``python -m evals.report`` (evals/report.py): the matched Best-of-N against hand-computed cases,
bad folders refused in a sentence, and the default comparison end to end on real run outputs (a
tiny J-BOND run, evals.xsum, a judge on loopback, evals.benchmarks), its HTML opened in headless
Chromium."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from bonbench.cli import run_command
from bonbench.server.launch import REPO, child_env
from evals.report import main
from evals.report_tables import NotARunFolder, load_runs, matched_n
from tests.evals.test_judge import JUDGE, JudgeState, build_judge_app
from tests.loopback import serve_in_thread


def test_matched_n_interpolates_in_log_n_and_refuses_what_the_curve_does_not_reach():
    ns, rates = [1, 2, 4, 8], [0.5, 0.6, 0.7, 0.8]
    assert matched_n(ns, rates, 0.6) == 2.0
    assert matched_n(ns, rates, 0.65) == pytest.approx(2 * math.sqrt(2))  # halfway between 2 and 4 in log N
    assert matched_n(ns, rates, 0.5) == 1.0 and matched_n(ns, rates, 0.8) == 8.0
    assert matched_n(ns, rates, 0.49) is None and matched_n(ns, rates, 0.81) is None
    # a noisy dip (BoN-4 below BoN-2) reads the curve as its running maximum
    assert matched_n(ns, [0.5, 0.7, 0.65, 0.8], 0.7) == 2.0


def test_a_folder_with_no_table_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(NotARunFolder, match="notes holds no table the report reads"):
        load_runs([tmp_path / "notes"])
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, ["--from", str(tmp_path / "missing"), "--reports", str(tmp_path / "reports")])
    assert exit_info.value.code == 2
    assert f"error: {tmp_path / 'missing'} is not a folder" in capsys.readouterr().err


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def default_report(tiny_model_path, tmp_path_factory):
    """The default comparison on the tiny model: one real J-BOND run under runs/, then evals.report
    with a judge app on loopback; returns the report folder and the runs folder."""
    root = tmp_path_factory.mktemp("report")
    runs = root / "runs"
    env = child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    train = [sys.executable, "-m", "distill.jbond", "--model", tiny_model_path, "--steps", "2",
             "--batch-prompts", "2", "--eval-prompts", "2", "--eval-k", "2", "--eval-every", "1",
             "--max-tokens", "8", "--out", str(runs / "jbond")]
    done = subprocess.run(train, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = JudgeState()
    with serve_in_thread(build_judge_app(state)) as url:
        report = [sys.executable, "-m", "evals.report", "--runs", str(runs), "--model", tiny_model_path,
                  "--limit", "2", "--bench-limit", "2", "--judge-base-url", f"{url}/v1", "--judge-model", JUDGE,
                  "--reports", str(root / "reports"), "--name", "tiny"]
        done = subprocess.run(report, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-5000:]
    assert state.chat_requests(), "the judge was never asked"
    return root / "reports" / "tiny", runs


def test_the_default_comparison_writes_every_table_and_figure(default_report):
    folder, runs = default_report
    methods = pd.read_csv(folder / "methods.csv")
    assert methods["method"].tolist()[:4] == ["reference", "BoN-2", "BoN-4", "BoN-8"]
    policy = methods[methods["kind"] == "policy"]
    assert len(policy) == 1 and policy["policy_path"].iloc[0] == str(runs / "jbond" / "policy")
    # Best-of-N pays N samples per answer, the policy one
    bon = methods.set_index("method")
    assert bon.loc["BoN-8", "tokens_per_answer"] > bon.loc["BoN-2", "tokens_per_answer"] > 0
    for png in ("cost_vs_quality.png", "win_rate_vs_n.png", "reward_vs_kl.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "report.md").read_text()
    for heading in ("## One sample of each policy against Best-of-N", "## Reward against KL", "## ROUGE and length",
                    "## Benchmarks (lm-eval)", "## Side-by-side (LLM judge)"):
        assert heading in text
    assert "bonbench_qa" in text and "policy:" in text and "reward: default" in text
    assert str(runs / "jbond") in text  # the training curve's run is named among the sources


def test_a_second_call_rebuilds_from_disk_without_sampling(default_report, tiny_model_path, tmp_path):
    folder, runs = default_report
    samples = runs / "evals" / "xsum" / "samples"
    before = {p: p.stat().st_mtime_ns for p in samples.rglob("*.parquet")}
    sources = [runs / "evals" / "xsum", runs / "evals" / "benchmarks", runs / "jbond",
               *sorted((runs / "evals" / "judge").iterdir())]
    run_command(main, ["--from", *map(str, sources), "--reports", str(tmp_path), "--name", "again"])
    assert {p: p.stat().st_mtime_ns for p in samples.rglob("*.parquet")} == before
    assert pd.read_csv(tmp_path / "again" / "methods.csv").equals(pd.read_csv(folder / "methods.csv"))


def test_the_html_report_renders_in_a_browser_with_its_tables_and_figures(default_report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs headless Chromium (apt-get install -y chromium)")
        pytest.skip("no Chromium here (apt-get install -y chromium)")
    page = (default_report[0] / "report.html").resolve()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<table") >= 4 and "BoN-4" in dom and "bonbench_qa" in dom
    assert dom.count('src="data:image/png;base64,') == 3  # self-contained: every figure embedded
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.std() > 0.05, "the screenshot is blank"
    assert (pixels.mean(axis=-1) < 0.5).mean() > 0.005, "no dark text or lines on the page"
