"""The footprint instrument: its numbers against known allocations, and every scenario
run small, with its series, plot and report."""
from __future__ import annotations

import json
import mmap
import os
import struct

import pytest

from qfram.lab import footprint

MIB = 1 << 20


def test_the_sampler_sees_an_allocation_come_and_go():
    sampler = footprint.Sampler(hz=50)
    sampler.watch("me", os.getpid())
    sampler.sample_once()
    region = mmap.mmap(-1, 64 * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for off in range(0, 64 * MIB, 4096):
        region[off] = 1
    sampler.sample_once()
    region.madvise(mmap.MADV_DONTNEED)
    sampler.sample_once()
    before, touched, released = sampler.series.by_label("me")
    assert abs((touched.rss - before.rss) - 64 * MIB) < 8 * MIB
    assert abs((touched.uss - before.uss) - 64 * MIB) < 8 * MIB
    assert abs((touched.rss - released.rss) - 64 * MIB) < 8 * MIB
    region.close()


def test_the_sampler_sees_shmem_that_rss_hides(tmp_path):
    fd = os.memfd_create("qfram-footprint-test")
    os.ftruncate(fd, 32 * MIB)
    region = mmap.mmap(fd, 32 * MIB)
    shmem0 = footprint.meminfo()["Shmem"]
    for off in range(0, 32 * MIB, 4096):
        region[off] = 1
    assert footprint.meminfo()["Shmem"] - shmem0 > 24 * MIB
    region.madvise(mmap.MADV_DONTNEED)             # unmapped, not freed
    assert footprint.meminfo()["Shmem"] - shmem0 > 24 * MIB
    region.close()
    os.close(fd)                                   # the file goes: now it is freed
    assert footprint.meminfo()["Shmem"] - shmem0 < 8 * MIB


def png_size(path) -> tuple:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_scenario_runs_small_and_reports(tmp_path):
    pytest.importorskip("matplotlib")
    size = 32 * MIB
    rows = footprint.run_experiments(list(footprint.SCENARIOS), size, str(tmp_path))
    by = {r["scenario"]: r for r in rows}
    assert set(by) == set(footprint.SCENARIOS)
    for name in footprint.SCENARIOS:
        stem = tmp_path / f"{name}-1"
        assert (stem.with_suffix(".csv")).stat().st_size > 100
        series = json.loads(stem.with_suffix(".json").read_text())
        assert series["samples"] and series["events"]
        assert png_size(stem.with_suffix(".png")) == (900, 450)
    report = (tmp_path / "report.md").read_text()
    assert all(name in report for name in footprint.SCENARIOS)
    assert "Shmem" in report and "qfram footprint" in report
    # what each scenario is there to show
    released = by["snapshot-release"]
    assert released["source_final_uss"] < released["source_peak_uss"] - size // 2
    kept = by["snapshot-keep"]
    assert kept["source_final_uss"] > kept["source_peak_uss"] - size // 4
    assert by["postcopy-release"]["source_final_uss"] < \
        by["postcopy-keep"]["source_final_uss"] - size // 2
    assert by["memfd-release"]["shmem_peak"] > size * 3 // 4
    assert by["postcopy-release"]["destination_final_uss"] > size * 3 // 4
