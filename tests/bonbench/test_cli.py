"""Bad input on the command line ends in one sentence on stderr (``error: ...``) and exit status 2,
with no traceback; ``--log-level debug`` keeps the traceback. Each case runs the real command,
``python -m bonbench ...``, in a subprocess that is offline with an empty Hugging Face cache."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bonbench.server.launch import REPO, child_env


def run_module(tmp_path, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS``, offline, with an empty Hugging Face cache."""
    env = child_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def bonbench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return run_module(tmp_path, "bonbench", *args)


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


# -- --config files: every command reads them through bonbench.config.parse_config ------------------

COMMANDS = [("bonbench", "serve"), ("bonbench", "measure"), ("distill.jbond",), ("distill.bond",),
            ("distill.rloo",), ("distill.bonbon",), ("evals.xsum",), ("evals.judge",), ("evals.benchmarks",),
            ("evals.report",)]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_config_file_is_one_sentence_for_every_command(tmp_path, command):
    missing = tmp_path / "missing.yaml"
    message = one_sentence(run_module(tmp_path, *command, "--config", str(missing)))
    assert message == f"the config file {missing} does not exist."


SERVE, XSUM, BENCHMARKS = ("bonbench", "serve"), ("evals.xsum",), ("evals.benchmarks",)
BAD_CONFIGS = [  # (case, command, file content, what the sentence says after the path)
    ("a folder", SERVE, None, "is a folder, not a YAML file"),
    ("not text", SERVE, b"\xff\xfe\x00", "is not text: invalid start byte at byte 0"),
    ("malformed", SERVE, b"n: [4, 8\nport: 1\n", "is not valid YAML: "),
    ("a list", SERVE, b"- n: 4\n", "holds a list, not a mapping of option names to values"),
    ("unknown options", SERVE, b"max-best-of: 4\ncolour: red\n",
     "has option(s) that ServeConfig does not have: max-best-of (did you mean max_best_of?), colour"),
    ("a word for an integer", SERVE, b"max_best_of: four\n",
     "gives max_best_of the value 'four', which is not an integer"),
    ("a word for a number", SERVE, b"max_body_mb: big\n", "gives max_body_mb the value 'big', which is not a number"),
    ("a number for a list", XSUM, b"ns: 4\n", "gives ns the value 4, which is not a list of integers"),
    ("an integer for a boolean", BENCHMARKS, b"reference: 1\n", "gives reference the value 1, which is not true or "
                                                                  "false"),
]


@pytest.mark.parametrize("command, content, words", [case[1:] for case in BAD_CONFIGS],
                         ids=[case[0] for case in BAD_CONFIGS])
def test_a_config_file_that_cannot_be_used_is_one_sentence_that_says_why(tmp_path, command, content, words):
    path = tmp_path / "bad.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    message = one_sentence(run_module(tmp_path, *command, "--config", str(path)))
    assert message.startswith(f"the config file {path} {words}")


def test_a_config_file_sets_options_with_numbers_as_yaml_writes_them(tmp_path):
    from bonbench.config import load_yaml
    from bonbench.serve import ServeConfig

    path = tmp_path / "good.yaml"
    path.write_text("gpu_memory_utilization: 5e-1\nmax_body_mb: 2\nn: 3\n")  # YAML reads 5e-1 as text
    options = load_yaml(ServeConfig, path)
    assert options == {"gpu_memory_utilization": 0.5, "max_body_mb": 2.0, "n": 3}
    assert isinstance(options["max_body_mb"], float)
