"""The bed's parts that need no root and no Slurm: its /etc/hosts edit, the lock, scontrol's line format."""

from __future__ import annotations

import pytest

from .bed import Bed, scontrol_fields
from . import record
from .record import MARK, BedError, Record, edit_hosts


def test_hosts_lines_are_added_and_removed_exactly(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n10.0.0.5 other # a comment of someone else's\n")
    edit_hosts(["198.18.0.11 node1", "198.18.0.12 node2"], str(hosts))
    lines = hosts.read_text().splitlines()
    assert lines[:2] == ["127.0.0.1 localhost", "10.0.0.5 other # a comment of someone else's"]
    assert lines[2:] == [f"198.18.0.11 node1 {MARK}", f"198.18.0.12 node2 {MARK}"]
    edit_hosts(["198.18.0.13 node3"], str(hosts))  # a second edit replaces the bed's lines, never adds to them
    assert hosts.read_text().splitlines()[2:] == [f"198.18.0.13 node3 {MARK}"]
    edit_hosts([], str(hosts))
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.5 other # a comment of someone else's\n"


def test_one_bed_at_a_time(monkeypatch, tmp_path):
    monkeypatch.setattr(record, "LOCK_NAME", f"\0etcd-agent-cluster-bed-test-{tmp_path.name}")  # not a real bed's
    monkeypatch.setattr(record, "STATE_DIR", tmp_path / "state")
    first, second = Record(), Record()
    first.lock(timeout=1)
    try:
        with pytest.raises(BedError, match="another cluster bed"):
            second.lock(timeout=0.3)
        assert Bed().teardown() is None  # a bed without the lock touches nothing
    finally:
        first.unlock()
    second.lock(timeout=1)
    second.unlock()


def test_scontrol_fields_keep_values_with_spaces():
    line = ("NodeName=node3 Arch=x86_64 CoresPerSocket=2 State=DOWN+NOT_RESPONDING "
            "Reason=Not responding [root@2026-12-07T01:38:40] Comment=(null)\n")
    fields = scontrol_fields(line)
    assert fields["State"] == "DOWN+NOT_RESPONDING"
    assert fields["Reason"] == "Not responding [root@2026-12-07T01:38:40]"
    assert fields["Comment"] == "(null)"
