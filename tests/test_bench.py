"""Every benchmark's --quick mode runs and returns a well-formed result; the link shim delays and
keeps order; the CLI writes JSON. (Timings are not asserted: benchmarks are not tests.)"""

from __future__ import annotations

import json
import time

import pytest
import torch
from typer.testing import CliRunner

from clicooper.bench.common import to_json
from clicooper.bench.links import LinkShim, LinkSpec, StageTimer, ThreadedTransport, wire_size
from clicooper.bench.suite import BENCHMARKS, Options
from clicooper.transport import Forward, Header

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("name", [n for n in BENCHMARKS if n != "multiprocess"])
def test_quick_benchmark_runs(name):
    result = BENCHMARKS[name].run(Options(quick=True, repeats=1, threads=1))  # conftest: 1 thread
    cols = result.columns()
    rows = result.rows()
    assert rows and all(len(r) == len(cols) for r in rows)
    doc = json.loads(json.dumps(to_json(result), default=str))
    assert doc["benchmark"] == name and "machine" in doc


def test_quick_multiprocess_chain_reports_rss_per_process():
    result = BENCHMARKS["multiprocess"].run(Options(quick=True, repeats=1))
    assert set(result.epoch_s) == {"in-process", "gRPC + mTLS"}
    assert all(len(ts) == 1 and ts[0] > 0 for ts in result.epoch_s.values())
    assert {v: len(ts) for v, ts in result.first_epoch_s.items()} == {v: 1 for v in result.epoch_s}
    assert any(note.startswith("first epoch") for note in result.notes())  # reported, not in medians
    assert {r.party for r in result.rss} == {"data_owner", "trainer_1"}
    assert all(r.setup_peak_mib > 50 for r in result.rss)
    assert result.bytes_per_step["data_owner->trainer_1"] > 0


def test_link_shim_delays_by_latency_and_rate_in_order():
    inner = ThreadedTransport()
    shim = LinkShim(inner, LinkSpec(latency_s=0.02, rate_bps=8e7))  # 10 MB/s
    got: list[tuple[int, float]] = []
    shim.register("trainer_1", lambda m: got.append((m.header.seq, time.perf_counter())))
    shim.register("data_owner", None)
    x = torch.zeros(25_000)  # 100 KB: 10 ms on the link
    t0 = time.perf_counter()
    for i in range(1, 4):
        shim.send(Forward(header=Header("j", "data_owner", "trainer_1", 0, i, i), activation=x))
    deadline = time.perf_counter() + 5
    while len(got) < 3 and time.perf_counter() < deadline:
        time.sleep(0.005)
    shim.close()
    assert [s for s, _ in got] == [1, 2, 3]
    per = wire_size(Forward(header=Header("j", "a", "b", 0, 0, 0), activation=x)) * 8 / 8e7
    assert got[0][1] - t0 >= 0.02 + per - 1e-3
    assert got[2][1] - t0 >= 0.02 + 3 * per - 1e-3  # serialised one after another on the link
    assert shim.busy["trainer_1"] >= 0


def test_acked_link_blocks_the_sender_for_the_round_trip():
    shim = LinkShim(ThreadedTransport(), LinkSpec(latency_s=0.02, rate_bps=None, acked=True))
    shim.register("trainer_1", lambda m: None)
    shim.register("data_owner", None)
    t0 = time.perf_counter()
    shim.send(Forward(header=Header("j", "data_owner", "trainer_1", 0, 0, 1), activation=torch.zeros(4)))
    assert time.perf_counter() - t0 >= 0.04 - 1e-3
    shim.close()


def test_windowed_acks_let_sends_go_on_until_the_sender_switches_links():
    """Window 3 at 100 ms one way: two sends return at once; a send on another link first waits for
    both acks (200 ms); the third send in a row on one link waits for the first one's ack."""
    shim = LinkShim(ThreadedTransport(), LinkSpec(latency_s=0.1, rate_bps=None, acked=True, window=3))
    for party in ("trainer_1", "trainer_3"):
        shim.register(party, lambda m: None)
    shim.register("data_owner", None)

    def send(receiver: str, seq: int) -> float:
        h = Header("j", "data_owner", receiver, 0, 0, seq)
        shim.send(Forward(header=h, activation=torch.zeros(4)))
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    assert send("trainer_1", 1) < 0.1 and send("trainer_1", 2) < 0.1
    assert 0.2 - 1e-3 <= send("trainer_3", 1) < 0.3  # switching: both acks on the last link first
    assert send("trainer_3", 2) < 0.3
    assert send("trainer_3", 3) >= 0.4 - 1e-3  # window full: the ack of trainer_3's first
    shim.close()
    assert LinkSpec(0.01, 1e8, acked=True, window=16).label() == "10 ms, 100 Mbit/s, acked sends, window 16"


def test_stage_timer_counts_waiting_of_the_pulling_party(digits):
    from clicooper.job import ChainJob
    from clicooper.transport import InProcTransport
    from tests.conftest import tiny_config

    timer = StageTimer(InProcTransport())
    job = ChainJob(tiny_config(training={"epochs": 1}), digits, None, transport=timer)
    job.data_owner.train_round(0)
    assert timer.waiting["data_owner"] > sum(timer.busy[t.name] for t in job.trainers) * 0.9
    assert all(timer.busy[t.name] > 0 for t in job.trainers)


def test_cli_writes_json(tmp_path):
    from clicooper.cli import app

    res = CliRunner().invoke(app, ["bench", "codec", "--quick", "--threads", "1", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "codec.json").read_text())
    assert doc["benchmark"] == "codec" and len(doc["sizes"]) == 2
    assert all(row["read_s"] > 0 for row in doc["sizes"])  # the floor's read is timed at every size
    for when in ("machine_at_start", "machine"):  # the load average before the run and after it
        assert len(doc[when]["load_avg"]) == 3 and doc[when]["torch_threads"] == 1
    printed = " ".join(res.output.split())  # rich wraps the machine line at the console's width
    assert f"load average {doc['machine_at_start']['load_avg'][0]}" in printed


def test_pipeline_model_uses_the_bubble_fraction():
    from clicooper.bench.pipeline import StageTimes

    unpiped = StageTimes(1, 4.0, {"data_owner": 1.0, "trainer_1": 2.0, "trainer_2": 1.0})
    piped = StageTimes(4, 4.5, {"data_owner": 1.1, "trainer_1": 2.0, "trainer_2": 1.2})
    assert unpiped.modelled_s == pytest.approx(4.0)
    assert piped.bubble == pytest.approx(2 / 6)
    assert piped.modelled_s == pytest.approx(2.0 * 6 / 4)


def test_wan_notes_compare_half_precision_links_only_where_a_float32_run_exists():
    from clicooper.bench.wan import WanBench, WanPoint

    share = {"data_owner": 0.5}
    pts = [
        WanPoint("a", 0.01, 1e8, 1, [2.0], share),
        WanPoint("a", 0.01, 1e8, 1, [1.0], share, wire_dtype="bfloat16"),
        WanPoint("b", 0.01, 1e8, 1, [1.0], share, wire_dtype="bfloat16"),  # no float32 run of "b"
    ]
    notes = WanBench(pts, 128, 128, 3).notes()
    assert any("a, 1 micro-batches: bfloat16 links take 0.50 x" in n for n in notes)
    assert not any(n.startswith("b,") for n in notes)


def test_relay_step_by_step_times_every_step_but_the_first(monkeypatch):
    """The centralized step beside each chain step trains on that step's batch, in epoch order."""
    from clicooper.bench import relay
    from clicooper.bench.common import bench_config
    from clicooper.job import prepare_data
    from clicooper.seeding import epoch_batches

    cfg = bench_config(True)  # 256 samples at batch 64: four steps
    data = prepare_data(cfg)
    labels: list[torch.Tensor] = []
    step = relay.centralized_step
    monkeypatch.setattr(relay, "centralized_step", lambda m, o, x, y: labels.append(y) or step(m, o, x, y))
    result = relay.step_interleaved(cfg, data)
    batches = epoch_batches(cfg.job.seed, 0, len(data.train_x), cfg.training.batch_size)
    assert len(labels) == len(batches) == 4 and result.steps == 3
    assert all(torch.equal(y, data.train_y[ids]) for y, ids in zip(labels, batches, strict=True))
    assert result.chain_s > 0 and result.centralized_s > 0 and result.ratio > 0
    assert result.block_ratios == pytest.approx([result.ratio])  # three steps: one block


def test_relay_block_ratios_cover_every_step_once():
    """Blocks of 50 paired steps, the short tail joined to the last full block, each its own ratio."""
    from clicooper.bench.relay import StepInterleaved, block_ratios

    chain = [2.0] * 100 + [3.0] * 37
    centralized = [1.0] * 137
    assert block_ratios(chain, centralized) == pytest.approx([2.0, (50 * 2 + 37 * 3) / 87])
    assert block_ratios([1.5] * 30, [1.0] * 30) == pytest.approx([1.5])  # fewer than a block: one
    assert block_ratios([], []) == []
    b = StepInterleaved(8.0, 7.0, 200, 1.0, 1.0, block_ratios([1.1] * 100 + [1.2] * 100, [1.0] * 200))
    assert b.block_ratios == pytest.approx([1.1, 1.1, 1.2, 1.2])
    assert "4 blocks of 50 steps or more" in b.spread() and "range 1.100-1.200" in b.spread()
    spread = StepInterleaved(1.0, 1.0, 400, 1.0, 1.0, [1.0, 1.2, 1.1, 1.4, 1.3, 1.5, 1.6, 1.7]).spread()
    assert "median 1.350, quartiles 1.125-1.575, range 1.000-1.700" in spread
    assert StepInterleaved(1.0, 1.0, 3, 1.0, 1.0, [1.0]).spread() == ""
