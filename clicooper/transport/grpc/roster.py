"""Who may talk to whom: the job's roster and the message kinds allowed on each directed link.

A server checks every inbound stream against this: the peer's authenticated identity must be in
the roster and have a link to the receiving party (trainer_2 may reach trainer_3 only as its
predecessor and trainer_1 only as its successor), and every frame's kind must be one the protocol
sends on that link (a Forward from trainer_3 to trainer_2 is refused, a Backward is not).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

DATA_OWNER = "data_owner"
VERIFIER = "verifier"
ABORT = "abort"
# Kinds that need no causal ordering against their sender's other links (see docs/transport.md,
# "Acknowledgement window"): an Abort is out of band, and a Backward sets off only gradients flowing
# up to the data owner, which waits for every one of a step's gradients before anything of the next
# step moves down the chain (but its Targets, which set nothing off), so nothing downstream can
# overtake a sender's earlier frames through it.
UNORDERED_KINDS = frozenset({ABORT, "backward"})


@dataclass(frozen=True)
class Roster:
    job_id: str
    trainers: tuple[str, ...]
    data_owner: str = DATA_OWNER
    verifier: str | None = None
    u_shaped: bool = False
    # extra (sender, receiver) -> kinds, for message kinds added later (e.g. segment delivery)
    extra: tuple[tuple[str, str, str], ...] = ()
    _links: dict[tuple[str, str], frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.trainers:
            raise ValueError("a roster needs at least one trainer")
        parties = self.parties
        if len(set(parties)) != len(parties):
            raise ValueError(f"duplicate party names in the roster: {parties}")
        links: dict[tuple[str, str], set[str]] = defaultdict(set)
        do, ts, v = self.data_owner, self.trainers, self.verifier
        links[(do, ts[0])].add("forward")
        links[(do, ts[-1])].add("backward" if self.u_shaped else "targets")
        links[(ts[-1], do)].add("output")
        links[(ts[0], do)].add("backward")
        for i, t in enumerate(ts):
            links[(do, t)].update({"round_end", "rewind"})
            links[(t, do)].add("round_sealed")
            if i + 1 < len(ts):
                links[(t, ts[i + 1])].add("forward")
                links[(ts[i + 1], t)].add("backward")
            if v is not None:
                links[(t, v)].update({"register", "stage_sealed", "final_segment"})
                links[(v, t)].add("nonce")
        if v is not None:
            links[(do, v)].update({"round_open", "rewind"})
            links[(v, do)].add("round_opened")
        for s, r, kind in self.extra:
            links[(s, r)].add(kind)
        # Any party may report a failure to the data owner, which drives the job, and the data
        # owner may tell anyone it reaches to stop.
        for p in parties:
            if p != do:
                links[(p, do)].add(ABORT)
                if (do, p) in links:
                    links[(do, p)].add(ABORT)
        object.__setattr__(self, "_links", {k: frozenset(v) for k, v in links.items()})

    @classmethod
    def chain(cls, job_id: str, n_trainers: int, *, verifier: bool = False, u_shaped: bool = False) -> Roster:
        """The default names ChainJob uses: data_owner, trainer_1..n, verifier."""
        return cls(
            job_id,
            tuple(f"trainer_{i + 1}" for i in range(n_trainers)),
            verifier=VERIFIER if verifier else None,
            u_shaped=u_shaped,
        )

    @property
    def parties(self) -> list[str]:
        return [self.data_owner, *self.trainers, *([self.verifier] if self.verifier else [])]

    def kinds(self, sender: str, receiver: str) -> frozenset[str]:
        """Message kinds `sender` may send to `receiver` (empty: no link)."""
        return self._links.get((sender, receiver), frozenset())

    def check_link(self, sender: str, receiver: str) -> str | None:
        """None if `sender` may open a link to `receiver`, else the reason it may not."""
        if sender not in self.parties:
            return f"{sender!r} is not in the roster of job {self.job_id!r}"
        if receiver not in self.parties:
            return f"{receiver!r} is not in the roster of job {self.job_id!r}"
        if not self.kinds(sender, receiver):
            return f"{sender} has no link to {receiver} in job {self.job_id!r} (wrong position)"
        return None
