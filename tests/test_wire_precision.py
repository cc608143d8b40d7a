"""Activations and gradients in lower precision on the wire (training.wire_dtype): what travels is
bfloat16 or float16, the parties still compute in float32, the model still learns (pipelined too),
both ends of a link hash the same bytes (a watermarked job is certified), and a peer that sends
the wrong precision is refused. (Over gRPC the weights equal the in-process job's bit for bit:
tests/test_grpc_chain.py. A pipelined job's do not equal its unpipelined twin's: their float32
results differ in the last bit, which a cast to bfloat16 now and then turns into one bfloat16
step, and training carries that on; after an epoch of digits the weights differ by about as much
as bfloat16 links differ from float32 ones, 4e-3 against 6e-3.)"""

from __future__ import annotations

import pytest
import torch

from clicooper.job import ChainJob
from clicooper.parties import ProtocolError, verify_run
from clicooper.transport import Backward, Forward, Header
from clicooper.transport.codec import copy_message, decode, encode, encode_frame
from clicooper.transport.inproc import InProcTransport
from clicooper.transport.messages import Output
from clicooper.transport.precision import WireRangeError, from_wire, to_wire
from tests.conftest import tiny_config

pytestmark = pytest.mark.timeout(180)


def _weights(job: ChainJob) -> list[torch.Tensor]:
    segs = [job.data_owner.head, *[t.segment for t in job.trainers]]
    return [v for s in segs for v in s.state_dict().values()]


class _Recording(InProcTransport):
    """In-process transport that keeps every message it delivers."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)
        super().send(msg)


def test_non_finite_bfloat16_is_refused_on_every_decoding_path():
    """(Round trips of bfloat16 messages: tests/test_codec.py.)"""
    x = torch.randn(7, 3).to(torch.bfloat16)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x[2, 1] = bad
        msg = Forward(header=Header("j", "a", "b", 0, 0, 1), activation=x)
        for path in (lambda m: decode(encode_frame(m)), lambda m: decode(encode(m)), copy_message):
            with pytest.raises(ValueError, match="NaN or infinity"):
                path(msg)


def test_to_wire_casts_and_refuses_what_float16_cannot_hold():
    t = torch.tensor([1.0, -2.5, 3e-3])
    assert to_wire(t, torch.float32, where="w").data_ptr() == t.data_ptr()  # no copy
    assert torch.equal(from_wire(to_wire(t, torch.bfloat16, where="w")), t.bfloat16().float())
    assert to_wire(torch.tensor([1e5]), torch.bfloat16, where="w").isfinite().all()  # float32's range
    with pytest.raises(WireRangeError, match=r"trainer_2: output: .*1e\+05.*bfloat16"):
        to_wire(torch.tensor([1.0, 1e5]), torch.float16, where="trainer_2: output")
    with pytest.raises(WireRangeError, match="magnitude 7e\\+04"):
        to_wire(torch.tensor([-7e4, 1.0]), torch.float16, where="w")
    # NaN and infinities are no range problem: they go out, and every receiver refuses them
    sent = to_wire(torch.tensor([1.0, float("nan"), float("inf")]), torch.float16, where="w")
    with pytest.raises(ValueError, match="NaN or infinity"):
        decode(encode_frame(Forward(header=Header("j", "a", "b", 0, 0, 1), activation=sent)))
    assert to_wire(torch.tensor([-65504.0, 65504.0]), torch.float16, where="w").isfinite().all()


@pytest.mark.parametrize(
    ("wire", "sections"),
    [
        ("bfloat16", {}),
        ("float16", {}),
        ("bfloat16", {"training": {"micro_batches": 4}}),
        ("bfloat16", {"privacy": {"u_shaped": True}}),  # features up and gradients down at the tail
    ],
)
def test_a_job_with_half_precision_links_sends_half_and_still_learns(digits, wire, sections):
    cfg = tiny_config(**sections).replace(training={"epochs": 3})
    ref = ChainJob(cfg, digits, None).run()
    tr = _Recording()
    job = ChainJob(cfg.replace(training={"wire_dtype": wire}), digits, None, transport=tr)
    summary = job.run()
    dtype = getattr(torch, wire)
    floats = [
        t
        for m in tr.sent
        for t in (getattr(m, f, None) for f in ("activation", "grad", "output"))
        if isinstance(t, torch.Tensor)
    ]
    assert floats and all(t.dtype == dtype for t in floats)
    # about half the bytes a step on a link between trainers (the header is the same size)
    hop = "trainer_1->trainer_2"
    assert summary.bytes_per_step[hop] < 0.55 * ref.bytes_per_step[hop]
    assert any(m.KIND == "backward" for m in tr.sent) and any(m.KIND == "output" for m in tr.sent)
    # the parties' weights stay float32; the model learns about as well (digits: ~0.9 at 3 epochs)
    assert all(w.dtype == torch.float32 for w in _weights(job) if w.is_floating_point())
    assert summary.test_accuracy > 0.8
    assert summary.test_accuracy == pytest.approx(ref.test_accuracy, abs=0.05)


def test_a_watermarked_dp_job_with_bfloat16_links_is_certified_and_resumes(digits, tmp_path):
    """Both ends of each link hash the bfloat16 tensor as sent, so the verifier's link check holds;
    resumed for a third round (DP and watermarks on), it is certified again."""
    cfg = tiny_config(
        training={"epochs": 2, "wire_dtype": "bfloat16"},
        watermark={"enabled": True, "n_bits": 64},
        model={"freeze_head": True},
        privacy={"dp": True, "epsilon": 2.0, "release": "one-shot", "gamma": 2},  # epochs may grow
    )
    run = tmp_path / "run"
    ChainJob(cfg, digits, run).run()
    verdict, _ = verify_run(run)
    assert verdict.ok, verdict.summary()
    summary = ChainJob(cfg.replace(training={"epochs": 3}), digits, run).run(resume=True)
    assert summary.epochs == 3
    verdict, _ = verify_run(run)
    assert verdict.ok, verdict.summary()


class _Holding(_Recording):
    """Keeps every message and delivers none: one party at a time, driven by the test."""

    def send(self, msg) -> None:
        self.sent.append(msg)


def test_a_peer_sending_the_wrong_precision_is_refused(digits):
    """Activations and gradients, at a trainer and at the data owner, in a bfloat16 job."""
    tr = _Holding()
    job = ChainJob(tiny_config(training={"wire_dtype": "bfloat16"}), digits, None, transport=tr)
    t1, do = job.trainers[0], job.data_owner
    x = torch.randn(4, *t1.input_shape)
    wrong = "dtype torch.float32, expected torch.bfloat16"
    with pytest.raises(ProtocolError, match=wrong):
        t1.handle(Forward(header=Header(job.job_id, "data_owner", "trainer_1", 0, 0, 1), activation=x))
    t1.handle(Forward(header=Header(job.job_id, "data_owner", "trainer_1", 0, 0, 2), activation=x.bfloat16()))
    (out,) = tr.sent  # trainer_1's activation for trainer_2, in bfloat16
    assert out.activation.dtype == torch.bfloat16
    grad = torch.ones(out.activation.shape)
    with pytest.raises(ProtocolError, match=wrong):
        t1.handle(Backward(header=Header(job.job_id, "trainer_2", "trainer_1", 0, 0, 1), grad=grad))
    reply = Backward(header=Header(job.job_id, "trainer_1", "data_owner", 0, 0, 1), grad=x)
    with pytest.raises(ProtocolError, match=wrong):
        do._check_grad(reply, like=x)


def test_the_data_owner_checks_the_last_trainers_output(digits):
    """Outputs (logits here; U-shaped features) must come in the wire precision, one row of the
    model's output shape per sample (before, a wrong shape went unnoticed into the accuracy)."""
    job = ChainJob(tiny_config(training={"wire_dtype": "bfloat16"}), digits, None)
    do = job.data_owner
    bad = [
        (torch.zeros(5, 10), "dtype torch.float32, expected torch.bfloat16"),
        (torch.zeros(4, 10, dtype=torch.bfloat16), r"shape \(4, 10\), expected \(5, 10\)"),
        (torch.zeros(5, 3, dtype=torch.bfloat16), r"shape \(5, 3\), expected \(5, 10\)"),
        (torch.zeros(5, 10, 2, dtype=torch.bfloat16), r"shape \(5, 10, 2\), expected \(5, 10\)"),
    ]
    for seq, (t, why) in enumerate(bad, start=1):
        job.transport.send(Output(header=Header(job.job_id, "trainer_3", "data_owner", 0, 0, seq), output=t))
        with pytest.raises(ProtocolError, match=why):
            do._receive_output(0, 0, rows=5)
    ones = torch.ones(5, 10, dtype=torch.bfloat16)
    job.transport.send(Output(header=Header(job.job_id, "trainer_3", "data_owner", 0, 0, 9), output=ones))
    got = do._receive_output(0, 0, rows=5)
    assert got.dtype == torch.float32 and torch.equal(got, torch.ones(5, 10))
