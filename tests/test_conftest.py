"""Tests that need the shared parity fixtures skip without them, saying where they come from, and
fail only under CI (which always has them)."""
import pytest
from conftest import FIXTURES, find_fixtures


def test_missing_parity_fixtures_skip_with_their_source_and_fail_under_ci(tmp_path, monkeypatch):
    missing = str(tmp_path / "no-fixtures-here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        find_fixtures(missing)
    assert missing in str(skipped.value) and "../shared/fixtures beside the checkout" in str(skipped.value)
    assert "CONDENSEVIT_FIXTURES" in str(skipped.value)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI is set: CI must have them"):
        find_fixtures(missing)
    if FIXTURES and __import__("os").path.isdir(FIXTURES):
        assert find_fixtures(FIXTURES) == FIXTURES


def test_ci_run_sets_ci():
    import os
    text = open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run")).read()
    assert 'export CI="${CI:-1}"' in text.split("make test")[0]
