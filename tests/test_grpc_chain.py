"""The unchanged ChainJob over the gRPC transport: every party its own server and certificate,
all in this process, over loopback mutual TLS. Same final weights as in-process; a watermarked
run over gRPC is certified by the verifier."""

from __future__ import annotations

import pytest
import torch

from clicooper.job import ChainJob
from clicooper.parties import verify_run
from clicooper.transport.grpc import GrpcOptions, GrpcTransport, Roster, make_local_pki
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(180)


def _grpc(job_id: str, n_trainers: int, *, verifier: bool = False, ack_window: int = 1) -> GrpcTransport:
    roster = Roster.chain(job_id, n_trainers, verifier=verifier)
    pki = make_local_pki(None, job_id, roster.parties)
    options = GrpcOptions(ack_window=ack_window)
    return GrpcTransport(roster, {p: "127.0.0.1:0" for p in roster.parties}, tls=pki, options=options)


def _weights(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [v for s in segs for v in s.state_dict().values()]


@pytest.mark.parametrize(
    ("ack_window", "training"),
    [(1, {}), (8, {"micro_batches": 4}), (1, {"wire_dtype": "bfloat16"})],
    ids=["window-1", "window-8-micro-4", "bfloat16-links"],
)
def test_chain_over_grpc_mtls_reaches_the_in_process_weights(digits, ack_window, training):
    """Also with windowed acknowledgements and a pipelined relay (sends that do not wait for each
    acknowledgement), and with bfloat16 links (the same casts on either transport): the same
    weights, bit for bit."""
    cfg = tiny_config(training={"epochs": 2, **training})
    with _grpc("gchain", 3, ack_window=ack_window) as tr:
        job = ChainJob(cfg, digits, None, transport=tr, job_id="gchain")
        summary = job.run()
        assert not tr.refused and not tr.handler_errors
    ref = ChainJob(cfg, digits, None, job_id="gchain")
    ref_summary = ref.run()
    for a, b in zip(_weights(job), _weights(ref), strict=True):
        assert torch.equal(a, b)
    assert summary.test_accuracy == ref_summary.test_accuracy
    assert summary.bytes_per_step == ref_summary.bytes_per_step


@pytest.mark.parametrize("ack_window", [1, 8])
def test_watermarked_chain_over_grpc_is_certified(digits, tmp_path, ack_window):
    run = tmp_path / "wmrun"
    cfg = tiny_config(training={"epochs": 2}, watermark={"enabled": True, "n_bits": 64})
    with _grpc(run.name, 3, verifier=True, ack_window=ack_window) as tr:
        ChainJob(cfg, digits, run, transport=tr).run()
    verdict, cert = verify_run(run)
    assert verdict.ok, verdict.summary()
    assert cert is not None and sorted(verdict.final_watermarks) == [1, 2, 3]


def test_a_trainer_failure_aborts_the_job_with_its_reason(digits):
    """The same corruption as the in-process test (a wrong-shape gradient from trainer_2): over gRPC
    trainer_1's ProtocolError travels as an Abort and the data owner's round stops with it."""
    from clicooper.transport import Backward
    from clicooper.transport.grpc import RemoteAbort

    with _grpc("gabort", 3) as tr:
        job = ChainJob(tiny_config(), digits, None, transport=tr, job_id="gabort")
        t2 = job.trainers[1]
        original = t2.send

        def corrupt(cls, receiver, rnd, step, **fields):
            if cls is Backward:
                fields["grad"] = fields["grad"][:, :1]
            return original(cls, receiver, rnd, step, **fields)

        t2.send = corrupt
        with pytest.raises(
            RemoteAbort,
            match=r"trainer_1 aborted: .*ProtocolError: trainer_1: gradient from "
            r"trainer_2: shape",
        ):
            job.data_owner.train_round(0)


def test_activations_beyond_float16s_range_abort_the_job_naming_the_fix(digits):
    """float16 links and a trainer whose outputs overflow float16: the trainer refuses to send
    infinities, and over gRPC its error reaches the data owner as the job's abort reason."""
    from clicooper.transport.grpc import RemoteAbort

    with _grpc("gf16", 3) as tr:
        cfg = tiny_config(training={"epochs": 1, "wire_dtype": "float16"})
        job = ChainJob(cfg, digits, None, transport=tr, job_id="gf16")
        with torch.no_grad():
            for p in job.trainers[0].segment.parameters():
                p.mul_(1e4)  # trainer_2's outputs reach about 1e6
        with pytest.raises(RemoteAbort, match=r"trainer_\d: output: .* exceeds float16's largest .*bfloat16"):
            job.data_owner.train_round(0)
