"""Two processes over loopback mutual TLS: the data owner here, trainer_1 in a child process that
reads only its own credential folder. The data owner's process never loads a trainer's key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clicooper.transport import Backward, Forward, Header
from clicooper.transport.grpc import GrpcTransport, Roster, TlsCredentials, make_local_pki
from tests.grpc_helpers import FAST

pytestmark = pytest.mark.timeout(90)
JOB = "procjob"
ROOT = Path(__file__).resolve().parents[1]


def test_data_owner_and_trainer_in_separate_processes(tmp_path):
    roster = Roster.chain(JOB, 1)
    make_local_pki(tmp_path, JOB, roster.parties)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.grpc_peer", JOB, "1", "trainer_1", str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = child.stdout.readline().split()
        assert line[:1] == ["READY"], line
        own = TlsCredentials.load(tmp_path / "data_owner")  # only the data owner's folder is read
        do = GrpcTransport(
            roster, {"data_owner": "127.0.0.1:0", "trainer_1": line[1]}, tls={"data_owner": own}, options=FAST
        )
        do.register("data_owner", None)
        child.stdin.write(json.dumps({"data_owner": do.addresses["data_owner"]}) + "\n")
        child.stdin.flush()
        for step in range(5):
            x = torch.randn(16, 8, 7, 7)
            do.send(Forward(header=Header(JOB, "data_owner", "trainer_1", 0, step, step + 1), activation=x))
            reply = do.receive("data_owner", timeout=20)
            assert isinstance(reply, Backward) and reply.header.sender == "trainer_1"
            assert torch.equal(reply.grad, x * 2) and reply.loss == step
        assert not do.refused
        do.close()
    finally:
        child.stdin.close()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    assert child.returncode == 0
