"""pebr_mega.rewards.guard: grading under a per-sample time limit (issue 12, item 6).

The adversarial answers below made MathRuler's `grade_answer` run forever in-process (checked by hand with a
`timeout` around a plain call: it never returned); here they finish within the limit, score 0 and are counted.
"""
from __future__ import annotations

import os
import time

import pytest

from pebr_mega.rewards import RewardConfig, accuracy_reward, build_reward, format_reward, summarize
from pebr_mega.rewards.guard import ERROR, OK, TIMEOUT, RewardPool
from pebr_mega.rewards.model import RewardSample
from pebr_mega.trainer.evaluate import grade_answers

# Wide enough that an ordinary answer is never cut short on a loaded machine (sympy can take most of a
# second there), short enough to keep the test quick: an adversarial answer never finishes anyway.
TIMEOUT_S = 3.0
# (answer, ground truth) pairs whose grading never finishes without a deadline.
ADVERSARIAL = [("9**9**9**9", "1.5"), ("9999999!", "1.5"), ("(x+1)**10000", "x")]
ORDINARY = [("3", "3"), ("4", "5"), ("\\frac{1}{2}", "0.5"), ("$\\boxed{12}$", "12"), ("2.0", "2"), ("x+1", "1+x"),
            ("seven", "7"), ("", "1")]


def _response(answer: str) -> str:
    return ("### Image Description: three red circles\n### Rationales: count them\n### Step 1: 3\n"
            f"### The final answer is: {answer}")


@pytest.fixture(scope="module")
def pool():
    p = RewardPool(TIMEOUT_S, num_workers=2, memory_mb=2048)
    yield p
    p.close()


def test_adversarial_answers_finish_within_the_limit_score_0_and_are_counted(pool):
    cfg = RewardConfig(timeout_s=TIMEOUT_S, num_workers=2)
    model = build_reward(cfg, "stage2", pool=pool)
    pairs = ORDINARY[:3] + ADVERSARIAL + ORDINARY[3:]
    batch = [RewardSample(response=_response(a), response_tokens=20, answer=t) for a, t in pairs]
    pool.run([(abs, (-1,))])  # the workers' start-up is not part of the limit
    t0 = time.monotonic()
    results = model.score(batch)
    elapsed = time.monotonic() - t0
    # Three overruns of TIMEOUT_S on two workers, plus the ordinary answers and the replaced workers' start-up
    # (a second or two each, several on a loaded machine): bounded, where each of the three alone never ends.
    assert elapsed < 90, elapsed
    timed_out = [r.timed_out for r in results]
    assert timed_out == [False] * 3 + [True] * 3 + [False] * (len(ORDINARY) - 3)
    for r in results[3:6]:
        assert r.total == 0.0 and set(r.components.values()) == {0.0}
    assert summarize(results)["reward/timeouts"] == 3.0
    assert "timeout" in model.last_errors
    # Ordinary answers score exactly as the in-process functions do.
    for (a, t), r in zip(pairs, results):
        if (a, t) in ORDINARY:
            acc, fmt = accuracy_reward(_response(a), t), format_reward(_response(a))
            assert (r.components["accuracy"], r.components["format"]) == (acc, fmt)
            assert r.total == pytest.approx(0.9 * acc + 0.1 * fmt) and not r.failures
    assert summarize(model.score(batch[:3]))["reward/timeouts"] == 0.0  # the pool goes on after the kills


def test_evaluation_and_sampling_grade_through_the_pool(pool):
    pairs = [(_response(a), t) for a, t in ORDINARY[:2] + ADVERSARIAL[:1]]
    grades = grade_answers(pool, pairs)
    assert grades.accuracy == [1.0, 0.0, 0.0] and grades.format == [1.0, 1.0, 0.0] and grades.timeouts == 1
    only_accuracy = grade_answers(pool, pairs, with_format=False)
    assert only_accuracy.accuracy == [1.0, 0.0, 0.0] and only_accuracy.timeouts == 1


def test_a_dead_worker_is_replaced_and_the_batch_goes_on(pool):
    calls = [(abs, (-1,)), (os._exit, (3,)), (abs, (-2,)), (time.sleep, (3600,)), (abs, (-3,)), (divmod, (1, 0))]
    t0 = time.monotonic()
    out = pool.run(calls)
    assert time.monotonic() - t0 < 60
    assert [o.status for o in out] == [OK, ERROR, OK, TIMEOUT, OK, ERROR]
    assert [o.value for o in out if o.status == OK] == [1, 2, 3]
    assert "exit code 3" in out[1].error and "ZeroDivisionError" in out[5].error
    assert pool.run([(abs, (-5,))])[0].value == 5


def test_memory_cap_fails_the_call_not_the_machine():
    small = RewardPool(TIMEOUT_S * 5, num_workers=1, memory_mb=512)
    try:
        out = small.run([(bytearray, (2 << 30,)), (abs, (-1,))])
    finally:
        small.close()
    assert out[0].status == ERROR and "MemoryError" in out[0].error
    assert (out[1].status, out[1].value) == (OK, 1)


def test_pool_settings_are_checked():
    with pytest.raises(ValueError, match="timeout_s"):
        RewardPool(0, 1)
    with pytest.raises(ValueError, match="num_workers"):
        RewardPool(1.0, 0)
