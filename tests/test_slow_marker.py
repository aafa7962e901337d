"""The `slow` marker: such tests are skipped unless VGRT_RUN_SLOW=1 (tests/conftest.py)."""

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.slow
def test_slow():
    pass

def test_quick():
    pass
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nmarkers =\n    slow: minutes of CPU time")
    pytester.makeconftest("from tests.conftest import pytest_collection_modifyitems  # noqa: F401")
    pytester.makepyfile(test_marked=TESTS)
    return pytester


def test_slow_tests_are_skipped_without_the_variable(suite, monkeypatch):
    monkeypatch.delenv("VGRT_RUN_SLOW", raising=False)
    result = suite.runpytest("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *test_marked.py*: slow: set VGRT_RUN_SLOW=1"])


@pytest.mark.parametrize("value", ["0", ""])
def test_only_1_turns_them_on(suite, monkeypatch, value):
    monkeypatch.setenv("VGRT_RUN_SLOW", value)
    suite.runpytest().assert_outcomes(passed=1, skipped=1)


def test_slow_tests_run_with_the_variable(suite, monkeypatch):
    monkeypatch.setenv("VGRT_RUN_SLOW", "1")
    suite.runpytest("--strict-markers").assert_outcomes(passed=2)
