"""Reasoning problems: prompts, answer extraction, grading and the clustered intervals (no model)."""

from __future__ import annotations

import importlib.util

import pytest

from agentmem.bench.problems import (
    Problem,
    answers_in,
    clustered_wilson,
    extract_answer,
    paired_difference,
    problems,
    wilson,
)

THREE = Problem(0, "q", ("114", "47", "-20"), "chain_sum")


def test_answers_belong_to_the_problem_named_before_them():
    text = (
        "### Problem 1: 98 + 93 - 77\n98 + 93 = 191, 191 - 77 = 114. So \\boxed{114}.\n"
        "### Problem 3: 60 - 80\nthe answer to Problem 3 is \\boxed{-20}\n"
        "### Problem 2: 43 + 14 - 10\n57 - 10 = 47, first \\boxed{57}, no: \\boxed{47}\n"
    )
    assert answers_in(text, 3) == ["114", "47", "-20"]
    assert THREE.grade(text) == [True, True, True]


def test_unanswered_and_unnamed_problems():
    assert answers_in("Problem 1: \\boxed{114}\nProblem 2: I give up", 3) == ["114", None, None]
    assert answers_in("\\boxed{114} and \\boxed{46}", 3) == ["114", "46", None]  # no names: in order
    assert THREE.grade("\\boxed{114, 47, -20}") == [False, False, False]  # one box for all: not graded
    assert answers_in("Problem 7: \\boxed{3}", 3) == [None, None, None]  # no such problem


def test_one_problem_answers():
    assert extract_answer("so \\boxed{\\frac{1}{2}} then \\boxed{72}") == "72"
    assert extract_answer("the answer is 1,200 apples") == "1,200"
    assert extract_answer("nothing") is None
    p = Problem(0, "q", ("72",), "gsm_symbolic")
    assert p.grade("Final answer: \\boxed{72 \\text{ clips}}") == [True]
    assert p.grade("\\boxed{71}") == [False]


def test_clustered_interval_is_wider_when_a_prompt_shares_its_fate():
    independent = [[True], [False]] * 20
    assert clustered_wilson(independent) == pytest.approx(wilson(20, 40))
    mixed = [[True, False, True, False]] * 10  # no correlation inside a prompt
    lo, hi = clustered_wilson(mixed)
    assert (lo, hi) == pytest.approx(wilson(20, 40))
    shared = [[True] * 4, [False] * 4] * 5  # every prompt all right or all wrong: 10 effective samples
    lo2, hi2 = clustered_wilson(shared)
    assert hi2 - lo2 > hi - lo and (lo2, hi2) == pytest.approx(wilson(5, 10), abs=0.02)


def test_paired_difference_clusters_by_prompt():
    a = [[True, True], [True, False], [False, False]]
    b = [[True, False], [True, False], [False, False]]
    d, lo, hi = paired_difference(a, b)
    assert d == pytest.approx(1 / 6) and lo < d < hi
    assert paired_difference([True, False], [True, False]) == (0.0, 0.0, 0.0)
    flat = paired_difference([True, True, False, True], [False, True, False, False])
    grouped = paired_difference([[True], [True], [False], [True]], [[False], [True], [False], [False]])
    assert flat == pytest.approx(grouped)


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="needs reasoning-gym (make install)")
def test_prompts_hold_their_problems_and_answers():
    ps = problems(3, seed=7, dataset="chain_sum", per_prompt=4)
    assert ps == problems(3, seed=7, dataset="chain_sum", per_prompt=4)  # seeded
    for p in ps:
        lines = [line for line in p.question.splitlines() if line.startswith("Problem ")]
        assert len(lines) == 4 == len(p.answers)
        for line, gold in zip(lines, p.answers):
            expression = line.split(": ", 1)[1]
            assert int(eval(expression)) == int(gold), line  # the statement is the problem, exactly
    one = problems(2, seed=7, dataset="chain_sum", per_prompt=1)
    assert len(one[0].answers) == 1 and "\\boxed{}" in one[0].question
