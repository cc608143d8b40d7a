"""A trainer's provenance duties during a job (the `TrainerHooks` of parties/trainer.py).

Per round: derive the watermark from the verifier's nonce and the preceding records,
add its regulariser to every local step, hash the transcript with each neighbour, and
at round end sign a stage record and transcript attestations for the verifier.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from clicooper.background import submit
from clicooper.provenance.identity import Identity
from clicooper.provenance.records import (
    TranscriptHasher,
    attest_transcript,
    build_stage_record,
    link_direction,
    sign_record,
)
from clicooper.provenance.watermark import WatermarkEmbedder, WatermarkSpec

log = logging.getLogger("clicooper.provenance")


def _link_hashers() -> dict[str, TranscriptHasher]:
    """One transcript per link, hashed on the background thread while training goes on."""
    return {"prev": TranscriptHasher(background=True), "next": TranscriptHasher(background=True)}


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """Autograd's in-place modification counters: any in-place write to a tensor increments its own."""
    return [t._version for t in tensors]


@dataclass(frozen=True)
class _GradAhead:
    """A regulariser gradient being computed on the background thread, and what it was computed from."""

    embedder: WatermarkEmbedder
    kernels: list[torch.Tensor]
    versions: list[int]
    future: Future[torch.Tensor]

    def valid_for(self, embedder: WatermarkEmbedder, kernels: list[torch.Tensor]) -> bool:
        """Computed by this round's embedder from these kernel tensors, none written to since."""
        same = len(kernels) == len(self.kernels) and all(
            a is b for a, b in zip(kernels, self.kernels, strict=True)
        )
        return embedder is self.embedder and same and _versions(kernels) == self.versions


class StageProvenance:
    """State of one trainer's watermark and records; checkpointed with the trainer."""

    def __init__(
        self,
        *,
        identity: Identity,
        wm_key: bytes,
        spec: WatermarkSpec,
        job_id: str,
        position: int,
        prev: str,
        next: str | None,
        n_positions: int,
    ) -> None:
        self.identity, self.wm_key, self.spec = identity, wm_key, spec
        self.job_id, self.position, self.n_positions = job_id, position, n_positions
        self.prev, self.next = prev, next
        self.round: int | None = None
        self.nonce: bytes = b""
        self.links: list[str] = []
        self.embedder: WatermarkEmbedder | None = None
        self.hashers = _link_hashers()
        self._ahead: _GradAhead | None = None

    def open_round(self, rnd: int, nonce: bytes, links: list[str], segment: nn.Module) -> None:
        self.round, self.nonce, self.links = rnd, nonce, links
        self.embedder = WatermarkEmbedder.for_round(
            self.spec,
            self.wm_key,
            nonce=nonce,
            identity_fp=self.identity.fingerprint(),
            prev_digests=links,
            segment=segment,
        )
        self.hashers = _link_hashers()

    # -- TrainerHooks -----------------------------------------------------
    def add_regulariser_grad(self, segment: nn.Module) -> None:
        """Add the watermark regulariser's gradient to the segment's carrier kernels: the one computed
        ahead by `prepare_regulariser_grad` if it was computed from these very weights, else now."""
        if self.embedder is None:
            raise RuntimeError(
                f"trainer at position {self.position}: training before the verifier opened the round"
            )
        ahead, self._ahead = self._ahead, None
        fresh = ahead is not None and ahead.valid_for(self.embedder, self.embedder.kernels(segment))
        self.embedder.add_regulariser_grad(segment, ahead.future.result() if fresh else None)

    def prepare_regulariser_grad(self, segment: nn.Module) -> None:
        """Start computing the next step's regulariser gradient on the background thread from the weights
        as they are now (after the optimiser's step; only the next step changes them again). Takes about
        a millisecond a step off the trainer's critical path on the default job."""
        if self.embedder is not None:
            kernels = self.embedder.kernels(segment)
            self._ahead = _GradAhead(
                self.embedder, kernels, _versions(kernels), submit(self.embedder.regulariser_grad, kernels)
            )

    def observe(self, neighbour: str, direction: str, rnd: int, step: int, tensor: torch.Tensor) -> None:
        side = "prev" if neighbour == self.prev else "next"
        self.hashers[side].update_tensor(link_direction(side, direction), rnd, step, tensor)

    def registration(self) -> dict:
        """What the verifier needs before training: position, public key, escrowed watermark key."""
        return {
            "position": self.position,
            "public_key": self.identity.public_key_bytes().hex(),
            "wm_key": self.wm_key.hex(),
        }

    def seal(self, segment: nn.Module, rnd: int, steps: int, samples: int) -> tuple[str, str]:
        """Sign the round's stage record and transcript attestations (both JSON) for the verifier."""
        if self.round != rnd or self.embedder is None:
            raise RuntimeError(f"trainer at position {self.position}: round {rnd} was never opened")
        completed = self.embedder.complete(segment)
        if completed:
            log.info(
                "position %d, round %d: the regulariser left %d of %d watermark bits wrong; completed them",
                self.position,
                rnd,
                completed,
                self.spec.n_bits,
            )
        record = build_stage_record(
            job_id=self.job_id,
            rnd=rnd,
            position=self.position,
            identity=self.identity,
            wm_key=self.wm_key,
            nonce=self.nonce,
            bits=self.embedder.bits,
            state_dict=segment.state_dict(),
            steps=steps,
            samples=samples,
            transcripts={s: h.digest() for s, h in self.hashers.items()},
            prev_record_digests=self.links,
        )
        signed = sign_record(self.identity, record)
        neighbours = {
            "prev": self.position - 1 if self.position > 1 else None,
            "next": self.position + 1 if self.next is not None else None,
        }
        atts = [
            attest_transcript(
                self.identity, self.job_id, rnd, self.position, other, self.hashers[side].digest()
            )
            for side, other in neighbours.items()
            if other is not None  # the data owner's links are recorded in the record but not attested
        ]
        self.embedder = None
        return signed.to_json(), json.dumps([a.model_dump(mode="json") for a in atts])

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "nonce": self.nonce.hex(),
            "links": self.links,
            "hashers": {s: h.state_dict() for s, h in self.hashers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.round, self.nonce, self.links = state["round"], bytes.fromhex(state["nonce"]), state["links"]
        for s, h in self.hashers.items():
            h.load_state_dict(state["hashers"][s])
