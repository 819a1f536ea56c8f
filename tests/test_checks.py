"""The shared argument checks and bounded polling of `tf_backup._checks`."""

import time

import numpy as np
import pytest

from tf_backup import _checks
from tf_backup import errors


@pytest.mark.parametrize("value, error, message", [
    (1.5, TypeError, "`n` must be an integer >= 2. Received n=1.5"),
    (True, TypeError, "Received n=True"),
    ("3", TypeError, "Received n='3'"),
    (1, ValueError, "`n` must be an integer >= 2. Received n=1"),
])
def test_check_int_names_the_argument_and_the_value(value, error, message):
    with pytest.raises(error, match=message):
        _checks.check_int("n", value, 2)


def test_check_int_accepts_numpy_integers_and_optional_none():
    assert _checks.check_int("n", np.int64(3), 2) == 3 and type(_checks.check_int("n", np.int64(3), 2)) is int
    assert _checks.check_optional_int("n", None, 1) is None
    with pytest.raises(ValueError, match="a positive integer. Received n=0"):
        _checks.check_optional_int("n", 0, 1, kind="a positive integer")


@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), "1", None, True])
def test_check_seconds_refuses_what_is_not_a_positive_finite_number(value):
    with pytest.raises(ValueError, match=f"Received t={value!r}"):
        _checks.check_seconds("t", value)


def test_check_seconds_may_allow_zero():
    assert _checks.check_seconds("t", 0, allow_zero=True) == 0.0
    assert _checks.check_seconds("t", 2) == 2.0
    with pytest.raises(TypeError, match="Received flag='yes'"):
        _checks.check_bool("flag", "yes")


def test_backoff_grows_to_its_longest_sleep():
    sleeps = _checks.backoff(0.001, 0.004)
    assert [next(sleeps) for _ in range(6)] == pytest.approx([0.001, 0.0015, 0.00225, 0.003375, 0.004, 0.004])


def test_poll_until_returns_the_first_result_that_is_not_none_or_false():
    results = iter([None, False, np.array([0, 0]), "never"])
    got = _checks.poll_until(lambda: next(results), timeout=5.0, first=0.001, longest=0.001,
                             on_timeout=lambda waited: AssertionError("timed out"))
    np.testing.assert_array_equal(got, [0, 0])  # an array is a result, whatever its truth value


def test_poll_until_raises_the_error_it_is_given_past_its_timeout_and_checks_between_polls():
    checks = []
    start = time.monotonic()
    with pytest.raises(errors.StepTimeoutError, match="waited for the thing"):
        _checks.poll_until(lambda: False, timeout=0.05, first=0.01, longest=0.01, between=lambda: checks.append(1),
                           on_timeout=lambda waited: errors.StepTimeoutError(f"waited for the thing {waited:.2f} s"))
    assert time.monotonic() - start >= 0.05 and len(checks) >= 3
