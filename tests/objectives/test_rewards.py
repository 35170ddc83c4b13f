"""Reward functions for online RL (sft_jax/objectives/rewards.py): the built-ins equal TRL's
(trl.rewards) on the same completions, a function of your own loads by its import path, and
whatever a function gets wrong stops the run with its name and the prompt."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from trl.rewards import accuracy_reward, get_soft_overlong_punishment, think_format_reward

from sft_jax.core.errors import ConfigError
from sft_jax.objectives import rewards
from sft_jax.objectives.rewards import Reward, RewardError

SOLUTIONS = [r"\frac{1}{3}", r"\frac{1}{3}", "42", "42", r"2\sqrt{2}", "no math here"]
COMPLETIONS = [
    r"My answer is \boxed{\frac{1}{3}}",
    r"My answer is \boxed{\frac{1}{2}}",
    r"So the total is \boxed{42}.",
    r"The answer is $41$.",
    r"We get \boxed{\sqrt{8}}",
    r"\boxed{1}",
]


def test_math_equals_trls_accuracy_reward():
    ours = rewards.math_reward(["p"] * 6, COMPLETIONS, [[1]] * 6, solution=SOLUTIONS)
    theirs = accuracy_reward([[{"content": c}] for c in COMPLETIONS], SOLUTIONS)
    assert ours == theirs
    assert ours[:3] == [1.0, 0.0, 1.0] and ours[-1] is None  # the last solution does not parse


def test_format_and_length_equal_trls():
    texts = [
        "<think>\nwhy\n</think>\n42",
        "<think>why 42",
        "42",
        "<think>a</think><think>b</think>",
    ]
    ours = rewards.think_format_reward(["p"] * 4, texts, [[1]] * 4)
    assert ours == think_format_reward([[{"content": t}] for t in texts])
    ids = [[1] * n for n in (10, 80, 90, 100, 120)]
    penalty = rewards.SoftOverlongPunishment(100, 20)
    assert penalty(["p"] * 5, ["x"] * 5, ids) == get_soft_overlong_punishment(100, 20)(ids)
    assert penalty(["p"] * 5, ["x"] * 5, ids) == [0.0, 0.0, -0.5, -1.0, -1.0]


def test_exact_match_reads_the_answer_column_and_names_a_missing_one():
    got = rewards.exact_match_reward(["p", "p"], [" 7\n", "8"], [[1], [1]], answer=["7", "7"])
    assert got == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"`solution` \(or `answer`\) field.*its fields: level"):
        rewards.exact_match_reward(["p"], ["7"], [[1]], level=["easy"])


def test_a_function_of_your_own_loads_by_its_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def shorter(prompts, completions, completion_ids, **columns):\n"
        "    return [1.0 / len(ids) for ids in completion_ids]\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    chosen = rewards.rewards_from_config("my_rewards:shorter, think_format", "1, 0.5", 64)
    assert [(r.name, r.weight) for r in chosen] == [
        ("my_rewards:shorter", 1.0),
        ("think_format", 0.5),
    ]
    table = rewards.score(chosen, ["p", "q"], ["a", "<think></think>b"], [[1, 2], [3]], {})
    np.testing.assert_array_equal(table, [[0.5, 0.0], [1.0, 1.0]])
    with pytest.raises(ConfigError, match=r"'no_such_module:f'.*does not import.*PYTHONPATH"):
        rewards.load("no_such_module:f", 64)
    with pytest.raises(ConfigError, match=r"my_rewards has no function 'not_callable'"):
        rewards.load("my_rewards:not_callable", 64)
    with pytest.raises(ConfigError, match=r"'mathh': neither a built-in \(math, "):
        rewards.load("mathh", 64)
    with pytest.raises(ConfigError, match=r"2 weights for 1 reward functions"):
        rewards.rewards_from_config("math", "1,2", 64)
    sys.modules.pop("my_rewards", None)


def _reward(fn) -> list[Reward]:
    return [Reward("mine", fn)]


def test_a_function_that_fails_is_named_with_the_prompt():
    def boom(prompts, completions, completion_ids, **columns):
        raise KeyError("solution")

    with pytest.raises(
        RewardError, match=r"'mine' raised KeyError: 'solution' .*prompt: 'What is 2\+2\?'"
    ):
        rewards.score(_reward(boom), ["What is 2+2?"], ["4"], [[1]], {})
    with pytest.raises(RewardError, match=r"'mine' returned 1 values for 2 completions"):
        rewards.score(_reward(lambda **kw: [1.0]), ["p", "q"], ["a", "b"], [[1], [2]], {})
    with pytest.raises(RewardError, match=r"'mine' returned nan for completion 1 \(prompt: 'q'\)"):
        rewards.score(
            _reward(lambda **kw: [1.0, float("nan")]), ["p", "q"], ["a", "b"], [[1], [2]], {}
        )
    table = rewards.score(
        _reward(lambda **kw: [None, np.float32(2.0)]), ["p", "q"], ["a", "b"], [[1], [2]], {}
    )
    assert np.isnan(table[0, 0]) and table[1, 0] == 2.0
