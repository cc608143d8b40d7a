"""The launcher's supervision of party processes, with a stand-in program instead of real parties:
each start follows a plan written by the test (serve, die at once, die after serving, hang)."""

from __future__ import annotations

import sys

import pytest

from clicooper import launch

# argv: folder, party name. Counts its starts in <folder>/<name>.starts and does what
# <folder>/<name>.plan says for that start (the last word for every later start).
STAND_IN = """
import pathlib, sys, time
folder, name = pathlib.Path(sys.argv[1]), sys.argv[2]
counter = folder / f"{name}.starts"
n = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(n))
plan = (folder / f"{name}.plan").read_text().split()
what = plan[min(n, len(plan)) - 1]
if what == "die":
    sys.exit(9)
if what == "hang":
    time.sleep(60)
print("READY 127.0.0.1:1", flush=True)
sys.stdin.readline()
if what == "owner":  # the data owner: done once trainer_2 has been started three times
    while (folder / "trainer_2.starts").read_text() != "3":
        time.sleep(0.05)
    sys.exit(0)
print("SERVING", flush=True)
if what == "die-later":
    time.sleep(0.3)
    sys.exit(9)
time.sleep(60)
"""


def _job(tmp_path, monkeypatch, trainer_plan: str):
    script = tmp_path / "party.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(launch, "_PROGRAM", [sys.executable, str(script)])
    (tmp_path / "trainer_2.plan").write_text(trainer_plan)
    (tmp_path / "data_owner.plan").write_text("owner")
    logs = tmp_path / "logs"
    server, owner = (
        launch._start(name, [str(tmp_path), name, "--listen", "127.0.0.1:0"], logs)
        for name in ("trainer_2", "data_owner")
    )
    book = {"trainer_2": "127.0.0.1:1", "data_owner": "127.0.0.1:1"}
    for c in (server, owner):
        c.expect("READY", 30)
        launch._send_book(c, book)
    server.expect("SERVING", 30)
    return owner, [server], [server, owner], book, logs


def test_a_server_that_dies_again_while_restarting_is_started_again(tmp_path, monkeypatch):
    """trainer_2 dies while serving, its restart dies before its readiness line (a second kill, a
    crash on start): the launcher starts it a third time instead of giving up on the job."""
    owner, servers, children, book, logs = _job(tmp_path, monkeypatch, "die-later die serve")
    first = servers[0]
    try:
        code = launch._supervise(owner, servers, children, book, logs, 30, 60, max_restarts=3)
    finally:
        launch._stop(children, 10)
    assert code == 0
    assert (tmp_path / "trainer_2.starts").read_text() == "3"
    assert servers[0] is not first and servers[0].proc.returncode != 9  # the third start served


def test_a_restarted_server_that_never_gets_ready_fails_the_launch(tmp_path, monkeypatch):
    """A restart that is alive but silent is not mistaken for one that died: the start timeout
    ends the launch with a clear error."""
    owner, servers, children, book, logs = _job(tmp_path, monkeypatch, "die-later hang")
    try:
        late = r"trainer_2 did not print READY within 2s \(see .*trainer_2\.log\)"  # the log explains it
        with pytest.raises(launch.LaunchError, match=late):
            launch._supervise(owner, servers, children, book, logs, 2, 60, max_restarts=3)
    finally:
        launch._stop(children, 10)
