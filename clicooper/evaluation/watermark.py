"""Watermark robustness and verification cost (`clicooper eval watermark`).

One watermarked job and one identical unwatermarked job are trained; then an attacker
who holds the complete final model and a labelled tenth of the training data attacks
the marks (fine-tuning, last-layer re-training, pruning, int8 quantisation,
overwriting with its own mark), and the verifier is handed tampered evidence
(changed weights, reordered or replayed or missing stages, a forged chain). For every
attack: the fraction of segments whose mark is still detected and the model's test
accuracy afterwards.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clicooper.config import JobConfig  # noqa: E402
from clicooper.data import DatasetSplits  # noqa: E402
from clicooper.evaluation.report import Report  # noqa: E402
from clicooper.job import ChainJob, evaluate_model  # noqa: E402
from clicooper.parties.verifier import JobEvidence, load_evidence, verify_run  # noqa: E402
from clicooper.provenance import (  # noqa: E402
    Identity,
    WatermarkEmbedder,
    WatermarkVerdict,
    final_claims,
    new_watermark_key,
    sign_record,
    verify_chain,
)
from clicooper.seeding import generator  # noqa: E402


@dataclass
class MarkedModel:
    """The attacker's copy: the full model, and which blocks belong to which trainer position."""

    model: nn.Sequential
    positions: dict[int, nn.Module]


def _assemble(job: ChainJob) -> MarkedModel:
    model = copy.deepcopy(nn.Sequential(job.data_owner.head, *[t.segment for t in job.trainers]))
    return MarkedModel(model, {i: model[i] for i in range(1, len(job.trainers) + 1)})


def detect_all(mm: MarkedModel, ev: JobEvidence) -> dict[int, WatermarkVerdict]:
    """Each registered trainer's final mark, read from the segment at its position."""
    claims = final_claims(ev.records, ev.registry, ev.nonces, ev.spec)
    out = {}
    for fp, reg in ev.registry.items():
        c = claims[fp]
        emb = WatermarkEmbedder(
            ev.spec, reg.wm_key, c.bits, mm.positions[reg.position], round_nonce=c.round_nonce
        )
        out[reg.position] = emb.verdict(mm.positions[reg.position])
    return out


def _row(attack: str, setting: object, mm: MarkedModel, ev: JobEvidence, data: DatasetSplits) -> dict:
    verdicts = detect_all(mm, ev)
    return {
        "attack": attack,
        "setting": setting,
        "detection_rate": sum(v.matched for v in verdicts.values()) / len(verdicts),
        "max_bit_errors": max(v.bit_errors for v in verdicts.values()),
        "threshold": next(iter(verdicts.values())).threshold,
        "accuracy": evaluate_model(mm.model, data.test_x, data.test_y),
    }


def _train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    seed: int,
    params=None,
    extra_loss=None,
) -> None:
    opt = torch.optim.SGD(params if params is not None else model.parameters(), lr=lr, momentum=0.9)
    for e in range(epochs):
        order = torch.randperm(len(x), generator=generator(seed, "attack", e))
        model.train()
        for i in range(0, len(x), 64):
            ids = order[i : i + 64]
            loss = F.cross_entropy(model(x[ids]), y[ids])
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _prune(mm: MarkedModel, rate: float) -> MarkedModel:
    """Per-layer magnitude pruning of every conv/linear kernel."""
    out = copy.deepcopy(mm)
    with torch.no_grad():
        for m in out.model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                w = m.weight
                k = int(rate * w.numel())
                if k:
                    thr = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= thr] = 0.0
    out.positions = {p: out.model[p] for p in mm.positions}
    return out


def _int8(mm: MarkedModel) -> MarkedModel:
    """Symmetric per-tensor int8 quantise-dequantise of every floating parameter."""
    out = copy.deepcopy(mm)
    with torch.no_grad():
        for p in out.model.parameters():
            scale = p.abs().max().clamp_min(1e-12) / 127
            p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    out.positions = {p: out.model[p] for p in mm.positions}
    return out


def _evidence_attacks(ev: JobEvidence, segments: dict[int, dict], other: JobEvidence) -> list[dict]:
    """Tampered evidence handed to the verifier; each row: rejected or not, and the first reason."""

    def check(name: str, records, segs=segments, nonces=ev.nonces, registry=ev.registry) -> dict:
        v = verify_chain(
            ev.job_id,
            records,
            registry=registry,
            nonces=nonces,
            final_segments=segs,
            attestations=ev.attestations,
            n_positions=ev.n_positions,
            n_rounds=len(ev.nonces),
            wm_spec=ev.spec,
        )
        return {"attack": name, "rejected": not v.ok, "reason": str(v.failures[0]) if v.failures else "-"}

    recs = list(ev.records)
    by_slot = {(r.record.position, r.record.round): i for i, r in enumerate(recs)}
    last = max(r for _, r in by_slot)
    rows = [check("none (honest evidence)", recs)]
    tampered = {p: dict(s) for p, s in segments.items()}
    k = next(k for k in tampered[1] if k.endswith("weight"))
    tampered[1][k] = tampered[1][k].clone()
    tampered[1][k].view(-1)[0] += 1e-3
    rows.append(check("weight tampering (one weight +1e-3)", recs, segs=tampered))
    swapped = dict(segments)
    swapped[1], swapped[2] = segments[2], segments[1]
    rows.append(check("stage reordering (segments 1<->2 swapped)", recs, segs=swapped))
    replay_round = list(recs)
    replay_round[by_slot[(2, last)]] = recs[by_slot[(2, 0)]]
    rows.append(check("record replay from another round", replay_round))
    o = {(r.record.position, r.record.round): r for r in other.records}
    replay_job = list(recs)
    replay_job[by_slot[(1, 0)]] = o[(1, 0)]
    rows.append(check("record replay from another job", replay_job))
    rows.append(check("missing stage", [r for i, r in enumerate(recs) if i != by_slot[(3, 0)]]))
    forger = Identity.generate("forger")
    forged = [
        sign_record(forger, r.record.model_copy(update={"trainer": forger.fingerprint()})) for r in recs
    ]
    rows.append(check("forged chain (all records re-signed by an outsider)", forged))
    return rows


def run_watermark_eval(cfg: JobConfig, data: DatasetSplits, out: Path, *, quick: bool = False) -> Path:
    """Train, attack, verify; write report.md/.html, results.json and a plot into `out`."""
    if cfg.training.epochs < 2:
        raise ValueError(
            "the watermark evaluation needs at least 2 rounds (epochs) to test replay across rounds"
        )
    out.mkdir(parents=True, exist_ok=True)
    wm_cfg = cfg.replace(watermark={"enabled": True})
    plain_cfg = cfg.replace(watermark={"enabled": False})
    t0 = time.perf_counter()
    job = ChainJob(wm_cfg, data, out / "job")
    s_wm = job.run()
    train_s = time.perf_counter() - t0
    plain_job = ChainJob(plain_cfg, data, None)
    s_plain = plain_job.run()
    other_dir = out / "other_job"
    ChainJob(wm_cfg.replace(training={"epochs": 1}), data.subset(500, 100, seed=1), other_dir).run()
    t1 = time.perf_counter()
    verdict, _ = verify_run(out / "job")
    verify_s = time.perf_counter() - t1
    ev = load_evidence(out / "job" / "verifier")
    mm = _assemble(job)
    n_att = max(len(data.train_x) // 10, 200)
    ax, ay = data.train_x[:n_att], data.train_y[:n_att]
    lr = cfg.training.lr

    rows = [_row("none", "-", mm, ev, data)]
    # false positives: unwatermarked segments and wrong keys
    fp_rows = _false_positive_rows(_assemble(plain_job), mm, ev)
    ft_epochs = [1, 2] if quick else [1, 2, 3, 5, 8]
    ft = copy.deepcopy(mm)
    done = 0
    for e in ft_epochs:
        _train(ft.model, ax, ay, epochs=e - done, lr=lr, seed=cfg.job.seed + done)
        done = e
        rows.append(_row("fine-tune all layers", f"{e} epoch(s)", ft, ev, data))
    for lr_mult in [] if quick else [4.0]:
        strong = copy.deepcopy(mm)
        _train(strong.model, ax, ay, epochs=3, lr=lr * lr_mult, seed=cfg.job.seed)
        rows.append(_row("fine-tune all layers, lr x4", "3 epochs", strong, ev, data))
    rt = copy.deepcopy(mm)
    last_linear = [m for m in rt.model.modules() if isinstance(m, nn.Linear)][-1]
    last_linear.reset_parameters()
    _train(
        rt.model, ax, ay, epochs=1 if quick else 3, lr=lr, seed=cfg.job.seed, params=last_linear.parameters()
    )
    rows.append(_row("re-train last layer", "re-initialised", rt, ev, data))
    rates = [0.3, 0.6, 0.9] if quick else [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    for r in rates:
        rows.append(_row("magnitude pruning", f"{int(r * 100)}%", _prune(mm, r), ev, data))
    rows.append(_row("int8 quantisation", "per-tensor", _int8(mm), ev, data))
    rows += _overwrite_rows(mm, ev, data, ax, ay, lr, cfg.job.seed, quick)
    ev_rows = _evidence_attacks(
        ev, {p: s.state_dict() for p, s in mm.positions.items()}, load_evidence(other_dir / "verifier")
    )

    report = Report(f"Watermark robustness ({data.name}{', quick' if quick else ''})")
    setup = (
        f"Chain of {len(job.trainers)} trainers, {cfg.training.epochs} epoch(s), "
        f"{len(data.train_x)} training samples; {ev.spec.n_bits}-bit marks, strength {ev.spec.strength}."
    )
    thr = rows[0]["threshold"]
    bound = f"False-positive bound {ev.spec.fp_bound:g} per check: a match is at most {thr} bit errors."
    threat = f"The attacker holds the complete final model and {n_att} labelled training samples."
    report.text(f"{setup} {bound} {threat}")
    report.heading("Accuracy cost and verification cost")
    report.table(
        [
            {"run": "chain without watermark (baseline)", "test_accuracy": s_plain.test_accuracy},
            {"run": "chain with watermark", "test_accuracy": s_wm.test_accuracy},
        ]
    )
    report.table(
        [
            {
                "training_s": train_s,
                "verification_s": verify_s,
                "ratio": verify_s / train_s,
                "verdict": "verified" if verdict.ok else "REJECTED",
            }
        ]
    )
    report.heading("False positives (honest and unrelated models)")
    report.table(fp_rows)
    report.heading("Attacks on the marks (detection rate over segments, accuracy afterwards)")
    report.table(rows, ["attack", "setting", "detection_rate", "max_bit_errors", "threshold", "accuracy"])
    report.heading("Attacks on the evidence (verify job)")
    report.table(ev_rows)
    report.figure(_plot(rows, out), "detection rate and accuracy vs pruning rate and fine-tuning epochs")
    result = {
        "accuracy": {"plain": s_plain.test_accuracy, "watermarked": s_wm.test_accuracy},
        "verification_s": verify_s,
        "training_s": train_s,
        "attacks": rows,
        "false_positives": fp_rows,
        "evidence_attacks": ev_rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    md, _ = report.write(out)
    return md


def _false_positive_rows(plain: MarkedModel, mm: MarkedModel, ev: JobEvidence) -> list[dict]:
    claims = final_claims(ev.records, ev.registry, ev.nonces, ev.spec)
    checks: list[tuple[str, WatermarkVerdict]] = []
    for fp, reg in ev.registry.items():
        c = claims[fp]
        emb = WatermarkEmbedder(
            ev.spec, reg.wm_key, c.bits, mm.positions[reg.position], round_nonce=c.round_nonce
        )
        checks.append(("unwatermarked segment, right key", emb.verdict(plain.positions[reg.position])))
        for _ in range(10):
            wrong = WatermarkEmbedder(
                ev.spec, new_watermark_key(), c.bits, mm.positions[reg.position], round_nonce=c.round_nonce
            )
            checks.append(("watermarked segment, wrong key", wrong.verdict(mm.positions[reg.position])))
    rows = []
    for kind in dict.fromkeys(k for k, _ in checks):
        vs = [v for k, v in checks if k == kind]
        rows.append(
            {
                "check": kind,
                "n": len(vs),
                "false_matches": sum(v.matched for v in vs),
                "min_p_value": min(v.p_value for v in vs),
                "min_bit_errors": min(v.bit_errors for v in vs),
            }
        )
    return rows


def _overwrite_rows(mm, ev, data, ax, ay, lr, seed, quick) -> list[dict]:
    """The attacker embeds its own mark (fresh key and bits) into every segment while fine-tuning."""
    ow = copy.deepcopy(mm)
    embs = []
    for p, seg in ow.positions.items():
        bits = (torch.rand(ev.spec.n_bits, generator=generator(seed, "attacker-bits", p)) > 0.5).float()
        embs.append(
            (seg, WatermarkEmbedder(ev.spec, new_watermark_key(), bits, seg, round_nonce=b"attacker"))
        )

    def own_mark():
        return sum(10 * e.regulariser(s) for s, e in embs)

    _train(ow.model, ax, ay, epochs=1 if quick else 3, lr=lr, seed=seed, extra_loss=own_mark)
    row = _row("overwrite with attacker's mark", "strength x10", ow, ev, data)
    row["setting"] += (
        f"; attacker's own mark detected in {sum(e.verdict(s).matched for s, e in embs)}/{len(embs)}"
    )
    return [row]


def _plot(rows: list[dict], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, attack, label in (
        (axes[0], "magnitude pruning", "pruning rate"),
        (axes[1], "fine-tune all layers", "fine-tuning epochs"),
    ):
        rs = [r for r in rows if r["attack"] == attack]
        xs = [str(r["setting"]).split()[0] for r in rs]
        ax.plot(xs, [r["detection_rate"] for r in rs], "o-", label="detection rate")
        ax.plot(xs, [r["accuracy"] for r in rs], "s--", label="test accuracy")
        ax.axhline(rows[0]["accuracy"], color="grey", lw=0.8, label="accuracy before attack")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.05)
        ax.legend()
    fig.tight_layout()
    path = out / "watermark_robustness.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
