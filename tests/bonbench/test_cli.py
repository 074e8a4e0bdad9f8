"""Bad input on the command line ends in one sentence on stderr (``error: ...``) and exit status 2,
with no traceback; ``--log-level debug`` keeps the traceback. Each case runs the real command,
``python -m bonbench ...``, in a subprocess that is offline with an empty Hugging Face cache."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bonbench.server.launch import REPO, child_env


def bonbench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = child_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    return subprocess.run([sys.executable, "-m", "bonbench", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def one_sentence(result: subprocess.CompletedProcess) -> str:
    """The error sentence, after checking the exit status and that it is all the user sees of the error."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    last = result.stderr.strip().splitlines()[-1]
    assert errors == [last], result.stderr[-3000:]
    assert last.endswith(".") and ". " not in last, last  # one sentence
    return last.removeprefix("error: ")


def test_a_hub_model_offline_says_it_is_not_a_folder_and_how_to_get_it(tmp_path):
    message = one_sentence(bonbench(tmp_path, "serve", "--model", "Qwen/Qwen2.5-0.5B-Instruct"))
    assert message.startswith("the model Qwen/Qwen2.5-0.5B-Instruct is not a local folder")
    assert "hub is offline" in message
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in message and "pass a local model folder" in message


def test_a_missing_model_folder_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    message = one_sentence(bonbench(tmp_path, "serve", "--model", str(missing)))
    assert message.startswith(f"the model folder {missing} does not exist")


@pytest.mark.parametrize("spec, words", [
    ("nosuch:fn", "reward 'nosuch:fn': there is no module 'nosuch' to import"),
    ("bonbench.rewards:nosuch", "reward 'bonbench.rewards:nosuch': the module 'bonbench.rewards' has no "
                                "attribute 'nosuch'"),
])
def test_a_reward_function_that_cannot_be_found_says_what_is_missing(tmp_path, tiny_model_path, spec, words):
    message = one_sentence(bonbench(tmp_path, "serve", "--model", tiny_model_path, "--reward-model", spec))
    assert message.startswith(words)


def test_a_missing_reward_model_folder_says_it_does_not_exist(tmp_path, tiny_model_path):
    missing = tmp_path / "reward-models" / "missing"
    message = one_sentence(bonbench(tmp_path, "serve", "--model", tiny_model_path, "--reward-model", str(missing)))
    assert message.startswith(f"the reward model folder {missing} does not exist")


def test_measure_with_a_missing_policy_folder_says_it_does_not_exist(tmp_path, tiny_model_path):
    missing = tmp_path / "no-such-policy"
    result = bonbench(tmp_path, "measure", "--model", tiny_model_path, "--policy", str(missing),
                      "--out", str(tmp_path / "run"))
    assert one_sentence(result).startswith(f"the policy folder {missing} does not exist")


def test_log_level_debug_keeps_the_traceback(tmp_path, tiny_model_path):
    result = bonbench(tmp_path, "serve", "--model", tiny_model_path, "--reward-model", "nosuch:fn",
                      "--log-level", "debug")
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "ModuleNotFoundError: No module named 'nosuch'" in result.stderr  # the cause, chained
    assert result.stderr.strip().splitlines()[-1].startswith("bonbench.errors.UserError: reward 'nosuch:fn'")


def test_an_unknown_log_level_is_one_sentence(tmp_path):
    message = one_sentence(bonbench(tmp_path, "serve", "--log-level", "verbose"))
    assert message == "--log-level must be one of debug, info, warning, error, got 'verbose'."


def test_early_rejection_with_a_reward_that_cannot_score_partial_answers_says_so(tmp_path, tiny_model_path):
    spec = "tests.bonbench.rewards.test_function:brevity"  # a function reward without score_partial
    message = one_sentence(bonbench(tmp_path, "serve", "--model", tiny_model_path, "--reward-model", spec,
                                    "--early-rejection", "4:0.5"))
    assert message == (f"--early-rejection cannot run: the reward model '{spec}' cannot score partial answers "
                       "(it has no score_partial).")

