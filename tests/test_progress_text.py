"""The client's progress line: counts always, a rate and the time left for long sets."""

from __future__ import annotations

from taskcs.client.report import progress_text


def test_a_short_set_shows_counts_only() -> None:
    assert progress_text(3, 6, 0, 0.24) == "[3/6] 0 failed, 0.2s"


def test_a_long_set_shows_its_rate_and_the_time_left() -> None:
    assert progress_text(500, 2000, 2, 10.0) == "[500/2000] 2 failed, 10.0s, 50/s, ~30s left"
    assert progress_text(3, 30, 0, 6.0) == "[3/30] 0 failed, 6.0s, 0.5/s, ~54s left"
    assert progress_text(10, 1000, 0, 20.0) == "[10/1000] 0 failed, 20.0s, 0.5/s, ~33m00s left"


def test_a_finished_set_has_no_estimate() -> None:
    assert progress_text(6, 6, 1, 5.0) == "[6/6] 1 failed, 5.0s"
