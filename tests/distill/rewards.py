"""A continuous ``module:function`` reward for trainer tests: a tiny random model's answers are
noise, which the default reward clips to one value, and tied rewards give zero advantages."""


def distinct_characters(prompts, responses):
    return [len(set(r)) + 0.01 * len(r) for r in responses]
