"""``locate_model``: a model folder or a Hugging Face id is accepted before any weights load;
anything else is one ``UserError`` sentence saying what to do. The tests run offline."""

from __future__ import annotations

import json
import re

import pytest

from bonbench.errors import UserError
from bonbench.models import DEFAULT_POLICY, locate_model, resolve_policy


def test_a_model_folder_is_returned_as_it_is(tiny_model_path):
    assert locate_model(tiny_model_path) == tiny_model_path


def test_a_peft_adapter_folder_is_a_model_folder(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert locate_model(str(tmp_path)) == str(tmp_path)


@pytest.mark.parametrize("relative, words", [
    ("missing/deeper/folder", "the model folder {path} does not exist: pass an existing folder"),
    ("empty", "the model folder {path} holds no config.json or adapter_config.json"),
    ("weights.gguf", "the model {path} is a file: pass the folder that holds the model"),
])
def test_a_path_that_holds_no_model_is_a_user_error(tmp_path, relative, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    path = tmp_path / relative
    with pytest.raises(UserError, match=re.escape(words.format(path=path))):
        locate_model(str(path))


def test_a_hub_id_missing_from_the_cache_offline_says_so_and_what_to_do():
    with pytest.raises(UserError) as info:
        locate_model("bonbench-tests/no-such-model", kind="reward model")
    message = str(info.value)
    assert message.startswith("the reward model bonbench-tests/no-such-model is not a local folder")
    assert "offline (HF_HUB_OFFLINE=1)" in message and "hf download bonbench-tests/no-such-model" in message


def test_a_hub_id_in_the_cache_is_accepted_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "models--bonbench-tests--cached-model"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert locate_model("bonbench-tests/cached-model") == "bonbench-tests/cached-model"


def test_resolve_policy_turns_default_into_the_embedded_folder_and_checks_the_rest(default_model_path, tmp_path):
    assert resolve_policy(DEFAULT_POLICY) == default_model_path
    with pytest.raises(UserError, match="does not exist"):
        resolve_policy(str(tmp_path / "missing"))
