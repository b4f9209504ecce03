"""The soak suite (benchmarks/soak.py) at tiny sizes: seconds, not minutes.

Each scenario runs against its own real cs-server in a private directory, with real client
processes; what it reports must be right (no lost, duplicated or wrong result, the vanished
clients' work stopped), and the report file must carry date, machine and command.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import soak

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(120)]


def test_executor_kills_lose_nothing() -> None:
    outcome = soak.executor_kills(kills=3, set_size=60)
    assert outcome.ok, outcome.line
    assert outcome.figures["kills"] >= 3 and outcome.figures["right"] >= 60


def test_bad_frames_do_not_disturb_real_clients() -> None:
    outcome = soak.bad_frames(frames=2000, clients=1, tasks=300, oversized=1 << 16)
    assert outcome.ok, outcome.line
    assert outcome.figures["right"] == 300


def test_many_clients_are_all_served() -> None:
    outcome = soak.many_clients(counts=(1, 3), tasks=300)
    assert outcome.ok, outcome.line
    assert outcome.figures["rights"] == {1: 300, 3: 900}


def test_vanishing_clients_leave_nothing_behind() -> None:
    outcome = soak.vanishing_clients(victims=1, others=1, tasks=300)
    assert outcome.ok, outcome.line
    assert outcome.figures["leftover"] == 0


def test_the_report_names_date_machine_and_command(tmp_path: Path) -> None:
    out = tmp_path / "SOAK.md"
    outcomes = [soak.Outcome("a", True, "figure a"), soak.Outcome("b", None, "figure b"),
                soak.Outcome("c", False, "figure c")]
    soak.write_report(outcomes, out, "make soak", 90.0)
    text = out.read_text()
    assert "- date: " in text and "- machine: " in text and "`make soak`" in text
    assert "**ok** figure a" in text and "**pending** figure b" in text and "**FAILED** figure c" in text
