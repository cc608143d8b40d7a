"""The pipelined relay (training.micro_batches): the same weights as the unpipelined relay up to
float rounding, in-process and over gRPC; a watermarked pipelined job is certified; bad micro-batch
sequences are refused."""

from __future__ import annotations

import pytest
import torch

from clicooper.config import ConfigError
from clicooper.job import ChainJob
from clicooper.parties import ProtocolError, verify_run
from clicooper.transport import Forward, Header
from clicooper.transport.grpc import GrpcTransport, Roster, make_local_pki
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(180)


def _weights(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [v for s in segs for v in s.state_dict().values()]


def _assert_close(a: ChainJob, b: ChainJob) -> None:
    for x, y in zip(_weights(a), _weights(b), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("micros", "sections"),
    [
        (4, {}),  # 1,200 samples at batch 32: the last batch (16) splits too
        (3, {"training": {"optimizer": "adam", "lr": 0.003}}),  # uneven micro-batches: 11, 11, 10
        (5, {"privacy": {"gamma": 2, "secret_seed": 7}}),  # label expansion through the codebook
    ],
)
def test_pipelined_relay_reaches_the_unpipelined_weights(digits, micros, sections):
    cfg = tiny_config(**sections)
    ref = ChainJob(cfg, digits, None)
    ref_summary = ref.run()
    piped = ChainJob(cfg.replace(training={"micro_batches": micros}), digits, None)
    summary = piped.run()
    _assert_close(piped, ref)
    assert summary.test_accuracy == pytest.approx(ref_summary.test_accuracy, abs=0.01)


def test_pipelined_relay_over_grpc_with_a_trainable_head(digits):
    """Trainers run concurrently over gRPC; the head trains (accumulating over micro-batches)."""
    cfg = tiny_config(training={"epochs": 1, "micro_batches": 4})
    roster = Roster.chain("gpipe", 3)
    pki = make_local_pki(None, "gpipe", roster.parties)
    with GrpcTransport(roster, {p: "127.0.0.1:0" for p in roster.parties}, tls=pki) as tr:
        job = ChainJob(cfg, digits, None, transport=tr, job_id="gpipe")
        job.run()
        assert not tr.refused and not tr.handler_errors
    ref = ChainJob(cfg.replace(training={"micro_batches": 1}), digits, None)
    ref.run()
    _assert_close(job, ref)


def test_pipelined_watermarked_job_is_certified(digits, tmp_path):
    cfg = tiny_config(training={"epochs": 2, "micro_batches": 4}, watermark={"enabled": True, "n_bits": 64})
    ChainJob(cfg, digits, tmp_path / "run").run()
    verdict, _ = verify_run(tmp_path / "run")
    assert verdict.ok, verdict.summary()


def test_micro_batch_sequence_is_checked(digits):
    job = ChainJob(tiny_config(), digits, None)
    x = torch.randn(4, *job.trainers[0].input_shape)

    def fwd(seq: int, micro: int, micros: int, step: int = 0) -> Forward:
        h = Header(job.job_id, "data_owner", "trainer_1", 0, step, seq)
        return Forward(header=h, activation=x, micro=micro, micros=micros)

    t1 = job.trainers[0]
    with pytest.raises(ProtocolError, match="starts with micro-batch 1 of 2"):
        t1.handle(fwd(1, 1, 2))
    with pytest.raises(ProtocolError, match="starts with micro-batch 0 of 0"):
        t1.handle(fwd(2, 0, 0, step=1))


def test_u_shaped_pipelining_is_refused():
    with pytest.raises(ConfigError, match="micro_batches"):
        tiny_config(training={"micro_batches": 2}, privacy={"u_shaped": True}, model={"n_trainers": 2})
