"""The trainer's thread count follows the cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from egeunet import threads
from egeunet.threads import AdaptiveThreads, free_cores, machine_busy_seconds


def test_machine_busy_seconds_reads_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: busy = 100+5+20+3+2+1 = 131 ticks
    stat.write_text("cpu  100 5 20 900 50 3 2 1 0 0\ncpu0 1 2 3 4\n")
    ticks = threads.os.sysconf("SC_CLK_TCK")
    assert machine_busy_seconds(stat) == pytest.approx(131 / ticks)
    assert machine_busy_seconds(tmp_path / "missing") is None
    stat.write_text("intr 1 2 3\n")
    assert machine_busy_seconds(stat) is None


@pytest.mark.parametrize(
    ("others", "cores", "expected"),
    [
        (0.0, 2, 2),
        (0.2, 2, 2),
        (0.5, 2, 1),
        (1.0, 2, 1),
        (1.9, 2, 1),
        (1.2, 4, 3),
        (1.4, 4, 2),
        (8.0, 4, 1),
    ],
)
def test_free_cores(others, cores, expected):
    assert free_cores(others, cores) == expected


class FakeMachine:
    """A machine whose other processes keep ``others`` cores busy, with a fake clock."""

    def __init__(self, monkeypatch, cores: int = 2) -> None:
        self.now = 0.0
        self.machine = 0.0
        self.own = 0.0
        self.others = 0.0
        monkeypatch.setattr(threads, "usable_cores", lambda: cores)
        monkeypatch.setattr(threads, "machine_busy_seconds", lambda: self.machine)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)
        monkeypatch.setenv("EGEUNET_ADAPTIVE_THREADS", "1")

    def run(self, seconds: float, own_cores: float) -> None:
        self.now += seconds
        self.own += own_cores * seconds
        self.machine += (own_cores + self.others) * seconds


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_drop_when_another_process_takes_a_core_and_come_back(monkeypatch, restore_threads):
    machine = FakeMachine(monkeypatch)
    torch.set_num_threads(2)
    adaptive = AdaptiveThreads(window=10)
    assert adaptive.enabled
    machine.run(5, own_cores=2)
    assert adaptive.check() == 2  # the window has not passed yet
    machine.run(6, own_cores=2)
    assert adaptive.check() == 2 and not adaptive.changes  # idle machine: both cores
    machine.others = 1.0
    machine.run(11, own_cores=1.0)  # a busy loop on one core
    assert adaptive.check() == 1 and torch.get_num_threads() == 1
    assert adaptive.changes == [(1.0, 1)]
    machine.others = 0.0
    machine.run(11, own_cores=1.0)
    assert adaptive.check() == 2 and torch.get_num_threads() == 2


def test_fixed_threads_and_the_switch_leave_the_count_alone(monkeypatch, restore_threads):
    machine = FakeMachine(monkeypatch)
    fixed = AdaptiveThreads(fixed=1)
    assert torch.get_num_threads() == 1 and not fixed.enabled
    machine.others = 2.0
    machine.run(11, own_cores=1.0)
    assert fixed.check() == 1
    monkeypatch.setenv("EGEUNET_ADAPTIVE_THREADS", "0")
    assert not AdaptiveThreads().enabled
    assert not AdaptiveThreads(adapt=False).enabled  # a GPU run
    with pytest.raises(ValueError, match="threads: expected a positive integer"):
        AdaptiveThreads(fixed=0)


def test_cli_rejects_a_bad_thread_count(capsys):
    from egeunet.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--threads", "0"])
    assert "expected a positive integer, got '0'" in capsys.readouterr().err
