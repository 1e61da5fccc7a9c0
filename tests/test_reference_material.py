"""The reference material (../shared, torch): skipped when absent on a developer's machine, an error under CI."""

import pytest

from tests import conftest


@pytest.mark.parametrize("ci, outcome", [("", pytest.skip.Exception), ("true", pytest.fail.Exception)])
def test_missing_shared_skips_locally_and_fails_under_ci(ci, outcome, monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED", tmp_path / "absent")
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="shared reference material"):
        conftest.shared_path("fixtures", "parity")


def test_present_shared_path_is_returned(monkeypatch, tmp_path):
    (tmp_path / "fixtures").mkdir()
    monkeypatch.setattr(conftest, "SHARED", tmp_path)
    monkeypatch.setenv("CI", "true")
    assert conftest.shared_path("fixtures") == tmp_path / "fixtures"
