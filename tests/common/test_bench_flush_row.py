"""bench f's row (bench/__main__.py flush_row, table): the ratio of the means, each round's ratio,
both sides' per-move distribution and the CPU per role, from a measure_flush result. No lab."""

from __future__ import annotations

import pytest

from bench.__main__ import flush_row, move_stats, table


def move(vm: str, seconds: float, passes: int, downtime: int = 100) -> dict:
    return {"vm": vm, "slot": 0, "move_s": seconds, "memory_iteration": passes, "downtime": downtime}


def timeline(median: float) -> dict:
    return {"parallelism": 1.9, "idle_slot_s": 3.0, "move_median_s": median}


def cpu(daemon: float, zookeeper: float, load: float) -> dict:
    return {
        "daemon": daemon,
        "zookeeper": zookeeper,
        "libvirtd": 0.5,
        "qemu": 200.0,
        "other": 0.0,
        "machine_busy_s": 230.0,
        "machine_busy_share": 0.98,
        "load_min": load - 1,
        "load_mean": load,
        "load_max": load + 1,
    }


RESULT = {
    "ours": [100.0, 130.0],
    "virsh": [100.0, 100.0],
    "ours_moves": [[move("a", 40.0, 23), move("b", 50.0, 30, 1193)], [move("a", 40.0, 22), move("b", 80.0, 44)]],
    "virsh_moves": [[move("a", 45.0, 25), move("b", 45.0, 24)], [move("a", 44.0, 24), move("b", 46.0, 26, 301)]],
    "ours_timeline": [timeline(45.0), timeline(60.0)],
    "virsh_timeline": [timeline(45.0), timeline(45.0)],
    "ours_cpu": [cpu(0.6, 1.6, 7.0), cpu(0.8, 1.8, 9.0)],
    "virsh_cpu": [cpu(0.0, 0.5, 8.0), cpu(0.0, 0.7, 8.0)],
    "guest_resets": 1,
    "guest_lost_writes": 0,
}


def test_the_row_gives_each_rounds_ratio_beside_the_ratio_of_the_means():
    row = flush_row(RESULT, vms=2, parallel=2)
    assert row["ratio"] == 1.15
    assert row["round_ratios"] == [1.0, 1.3]
    assert not row["met"]
    assert "(2 rounds, alternating)" in row["what"]


def test_move_stats_over_all_rounds_of_a_side():
    stats = move_stats(RESULT["ours_moves"])
    assert stats["moves"] == 4
    assert stats["move_median_s"] == 45.0
    assert stats["move_mean_s"] == 52.5
    assert (stats["move_min_s"], stats["move_max_s"]) == (40.0, 80.0)
    assert (stats["passes_median"], stats["passes_mean"], stats["passes_max"]) == (26.5, 29.8, 44)
    assert (stats["downtime_median_ms"], stats["downtime_max_ms"]) == (100.0, 1193)
    assert stats["summed_s"] == [90.0, 120.0]


def test_summed_move_time_ratio_is_the_work_without_the_tails():
    row = flush_row(RESULT, vms=2, parallel=2)
    assert row["move_time_ratio"] == pytest.approx(210.0 / 180.0, abs=0.001)


def test_the_table_cell_shows_rounds_moves_and_cpu():
    line = table([flush_row(RESULT, vms=2, parallel=2)]).splitlines()[-1]
    assert line.startswith("| f |  | flush of a node running 2 busy real guests")
    assert "ours 115.0 s / virsh 100.0 s = 1.15 (each round: ours [100, 130], virsh [100, 100], ratio [1, 1.3];" in line
    assert "moves ours: 4 moves, median 45 s, mean 52.5 s (40-80), passes median 26.5, mean 29.8 (max 44)" in line
    assert "virsh: 4 moves, median 45 s, mean 45 s (44-46), passes median 24.5, mean 24.8 (max 26)" in line
    assert "summed move time ours/virsh 1.167" in line
    assert "CPU s per timed run (mean of rounds) ours/virsh: daemons 0.7/0, ZooKeeper 1.7/0.6" in line
    assert "load average 8/8 (max 9/9)" in line
    assert "median move ours 45/60 s, virsh 45/45 s" in line
    assert line.endswith("| ratio <= 1.05 | no |")


def test_a_row_kept_from_before_the_move_stats_still_renders():
    row = flush_row(RESULT, vms=2, parallel=2)
    for key in ("round_ratios", "ours_move_stats", "virsh_move_stats", "move_time_ratio", "ours_cpu", "virsh_cpu"):
        del row[key]
    line = table([row]).splitlines()[-1]
    assert "each round: ours [100, 130], virsh [100, 100]; per round, parallelism" in line
    assert "moves ours" not in line and "CPU" not in line
