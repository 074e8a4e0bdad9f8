"""``module:function`` rewards for the Best-of-N benchmark tests. Each call is appended to the JSONL
file named by ``$BONBENCH_TEST_REWARD_LOG`` (the server child inherits the test's environment), so a
test can check which reward saw which candidates and that the answer lm-eval got is the best one."""

import json
import os


def _record(reward: str, responses) -> None:
    with open(os.environ["BONBENCH_TEST_REWARD_LOG"], "a") as f:
        f.write(json.dumps({"reward": reward, "candidates": list(responses)}) + "\n")


def shortest(prompts, responses):
    _record("shortest", responses)
    return [-float(len(r)) for r in responses]


def longest(prompts, responses):
    _record("longest", responses)
    return [float(len(r)) for r in responses]
