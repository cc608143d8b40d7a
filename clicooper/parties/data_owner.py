"""The data owner: holds the data, the true labels, the head segment (and in U-shaped
mode the output layer), and drives training and evaluation through the chain.

What leaves it: released activations (clipped and noised when DP is on) to the
first trainer, and pseudo-labels (through the secret codebook when label expansion
is on) to the last trainer. Inputs, true labels and the codebook never leave.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clicooper.checkpoint import (
    load_module_optimizer_state,
    load_state,
    module_optimizer_state,
    round_prefix,
    save_state,
)
from clicooper.data import DatasetSplits
from clicooper.parties.base import (
    Party,
    ProtocolError,
    check_tensor,
    clear_grads,
    optimizer_grads,
    require_finite,
)
from clicooper.privacy.release_store import RELEASE_FILE, load_release, save_release
from clicooper.schedule import RoundLr, set_lr
from clicooper.seeding import epoch_batches
from clicooper.transport.base import Transport
from clicooper.transport.messages import (
    Backward,
    Forward,
    Output,
    RoundEnd,
    RoundOpen,
    RoundOpened,
    RoundSealed,
    Targets,
)
from clicooper.transport.precision import from_wire, to_wire

StepCallback = Callable[[int, int], None]


class DataOwnerDefence(Protocol):
    """The data owner's privacy defences (see clicooper.privacy.defence)."""

    one_shot: bool

    def check_round(self, rnd: int) -> None: ...
    def begin_round(self, rnd: int) -> None: ...
    def release(self, a: torch.Tensor, *, train: bool) -> torch.Tensor: ...
    def record_one_shot_release(self) -> None: ...
    def encode_labels(self, y: torch.Tensor, ids: torch.Tensor, rnd: int) -> torch.Tensor: ...
    def decode_logits(self, logits: torch.Tensor) -> torch.Tensor: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class DataOwner(Party):
    def __init__(
        self,
        *,
        job_id: str,
        transport: Transport,
        data: DatasetSplits,
        head: nn.Module,
        head_optimizer: torch.optim.Optimizer | None,
        trainers: list[str],
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        poisson: bool = False,
        tail: nn.Module | None = None,
        tail_optimizer: torch.optim.Optimizer | None = None,
        defence: DataOwnerDefence | None = None,
        verifier: str | None = None,
        checkpoint_dir: Path | None = None,
        name: str = "data_owner",
        lr_schedule: RoundLr | None = None,
        micro_batches: int = 1,
        wire_dtype: torch.dtype = torch.float32,
        output_shape: tuple[int, ...],
    ) -> None:
        super().__init__(name, job_id, transport)
        self.wire_dtype = wire_dtype  # activations, gradients, outputs travel in it (transport/precision.py)
        self.output_shape = tuple(output_shape)  # of an Output's rows: logits, or U-shaped features
        if micro_batches > 1 and tail is not None:
            raise ValueError("micro-batches are not supported in U-shaped mode")
        self.micro_batches = micro_batches
        self.data = data
        self.head, self.head_optimizer = head, head_optimizer
        self.tail, self.tail_optimizer = tail, tail_optimizer
        self.trainers = trainers
        self.first, self.last = trainers[0], trainers[-1]
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.poisson = seed, poisson
        self.defence = defence
        self.verifier = verifier
        self.checkpoint_dir = checkpoint_dir
        self.start_incarnation(checkpoint_dir)
        self.lr_schedule = lr_schedule
        self.rounds_done = 0
        self.last_round_steps = 0
        self._released: torch.Tensor | None = None  # one-shot release cache
        self._targets = torch.empty(0, dtype=torch.int64)  # this round's targets by sample id
        # called once a round has opened (the verifier has logged its plan and nonce), before training
        self.on_round_opened: Callable[[int], None] | None = None
        with torch.no_grad():
            self.activation_shape = tuple(head.eval()(data.train_x[:1]).shape[1:])
        transport.register(name, None)
        self._allowed: dict[type, tuple[str, ...]] = {
            Backward: (self.first,),
            Output: (self.last,),
            RoundSealed: tuple(trainers),
        }
        if verifier is not None:
            self._allowed[RoundOpened] = (verifier,)

    # -- helpers ----------------------------------------------------------
    def _receive(self, cls: type, rnd: int, step: int):
        msg = self.transport.receive(self.name)
        self.check_incoming(msg, self._allowed)
        if not isinstance(msg, cls) or (msg.header.round, msg.header.step) != (rnd, step):
            raise ProtocolError(
                f"{self.name}: expected {cls.KIND} for round {rnd} step {step}, got {msg.KIND} "
                f"for round {msg.header.round} step {msg.header.step} from {msg.header.sender}"
            )
        return msg

    def _round_targets(self, batches: list[torch.Tensor], rnd: int) -> torch.Tensor:
        """The targets the last trainer gets in round `rnd`, by sample id (-1 for samples not in the
        round), encoded in one call. Label DP and label expansion draw each sample's value from keyed
        hashes of its index, label and round, so one call for the round gives every batch what a call
        per batch would, without a call's fixed cost on every step (BENCHMARKS.md)."""
        table = torch.full((len(self.data.train_y),), -1, dtype=torch.int64)
        ids = torch.cat(batches).unique() if batches else table[:0]
        if ids.numel():
            y = self.data.train_y[ids]
            table[ids] = self.defence.encode_labels(y, ids, rnd) if self.defence else y
        return table

    def _loss_labels(self, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """U-shaped: the labels of the data owner's own loss, through label DP when it is on (the
        gradients it returns to the last trainer are then post-processing of the noisy labels)."""
        privatize = getattr(self.defence, "privatize_labels", None)
        return privatize(y, ids) if privatize is not None else y

    def _one_shot_release(self) -> torch.Tensor:
        """Release every training sample's activation once, from the frozen head.

        The release is kept in the data owner's private folder, so a resumed job sends the
        very same noised activations again (no new information, nothing to count). If that
        file is gone, a fresh release is drawn and counted by the accountant: two releases of
        one sample under independent noise are two mechanisms, never one.
        """
        if self._released is not None:
            return self._released
        path = self.checkpoint_dir / RELEASE_FILE if self.checkpoint_dir is not None else None
        expected = (len(self.data.train_x), *self.activation_shape)
        if path is not None and path.exists():
            self._released = load_release(path, expected)
            return self._released
        self.defence.record_one_shot_release()
        self.head.eval()
        with torch.no_grad():
            parts = [
                self.defence.release(self.head(self.data.train_x[i : i + 1024]), train=True)
                for i in range(0, len(self.data.train_x), 1024)
            ]
        self._released = torch.cat(parts)
        if path is not None:
            save_release(path, self._released)
        return self._released

    # -- training ---------------------------------------------------------
    def train_round(self, rnd: int, on_step: StepCallback | None = None) -> float:
        """One epoch through the chain; returns the mean training loss reported by the chain."""
        # The budget and a saved one-shot release are checked before the round opens, so that an
        # exhausted budget or a damaged release stops a resume before the verifier logs a nonce;
        # the round's per-step releases are counted once it has opened (a failed opening costs none).
        if self.defence is not None:
            self.defence.check_round(rnd)
        one_shot = self.defence is not None and self.defence.one_shot
        released_all = self._one_shot_release() if one_shot else None
        if self.verifier is not None:  # the verifier issues the round's nonce to every trainer
            self.send(RoundOpen, self.verifier, rnd, 0)
            self._receive(RoundOpened, rnd, 0)
        if self.defence is not None:
            self.defence.begin_round(rnd)
        if self.on_round_opened is not None:
            self.on_round_opened(rnd)
        if self.lr_schedule is not None:
            set_lr(self.head_optimizer, self.lr_schedule(rnd))
            set_lr(self.tail_optimizer, self.lr_schedule(rnd))
        batches = epoch_batches(self.seed, rnd, len(self.data.train_x), self.batch_size, poisson=self.poisson)
        if self.tail is None:  # U-shaped: the labels stay here
            self._targets = self._round_targets(batches, rnd)
        n_steps = len(batches)
        losses, samples = [], 0
        self.head.train(not one_shot)
        # an empty Poisson batch releases nothing: it is no step of the chain's
        steps = [(step, ids) for step, ids in enumerate(batches) if len(ids)]
        if steps:  # every later step's targets go ahead, sent during the step before it
            self._send_targets(rnd, *steps[0])
        for i, (step, ids) in enumerate(steps):
            after = steps[i + 1] if i + 1 < len(steps) else None
            if self.micro_batches > 1:
                loss_sum = self._pipelined_step(rnd, step, ids, released_all, after)
            else:
                loss_sum = self._step(rnd, step, ids, released_all, after)
            losses.append(loss_sum)
            samples += len(ids)
            if on_step is not None:
                on_step(step + 1, n_steps)
        self.last_round_steps = n_steps
        self._end_round(rnd, n_steps, samples)
        return sum(losses) / max(samples, 1)

    def _release(self, ids: torch.Tensor, released_all: torch.Tensor | None) -> torch.Tensor:
        if released_all is not None:
            return released_all[ids]
        a = self.head(self.data.train_x[ids])
        return self.defence.release(a, train=True) if self.defence else a

    def _receive_grad(self, rnd: int, step: int, like: torch.Tensor) -> Backward:
        reply: Backward = self._receive(Backward, rnd, step)
        self._check_grad(reply, like)
        return reply

    def _check_grad(self, reply: Backward, like: torch.Tensor) -> None:
        check_tensor(
            reply.grad,
            where=f"{self.name}: gradient from {self.first}",
            dtype=self.wire_dtype,
            shape=tuple(like.shape),
        )

    def _receive_output(self, rnd: int, step: int, rows: int) -> torch.Tensor:
        """The last trainer's output for a batch of `rows`, in float32 (logits, or U-shaped features)."""
        out: Output = self._receive(Output, rnd, step)
        check_tensor(
            out.output,
            where=f"{self.name}: output from {self.last}",
            dtype=self.wire_dtype,
            shape=(rows, *self.output_shape),
        )
        return from_wire(out.output)

    def _send_activation(self, rnd: int, step: int, a: torch.Tensor, **fields: Any) -> None:
        wire = to_wire(a, self.wire_dtype, where=f"{self.name}: activation")
        self.send(Forward, self.first, rnd, step, activation=wire, **fields)

    def _send_targets(self, rnd: int, step: int, ids: torch.Tensor) -> None:
        """The last trainer's targets for a step (one message per micro-batch when pipelined);
        U-shaped, the labels stay here and nothing is sent.

        A round's first step's targets go out as the round starts, every later step's while the step
        before travels the chain (`_send_targets_ahead`), when the data owner would otherwise sit
        idle: sent just before its Forward, each step would wait for their acknowledgement, a round
        trip to the last trainer, before its activations could leave. They still reach the last
        trainer before the Forward that needs them: they are sent before it, and the transport
        queues a party's message at its receiver before that party's next message on another link
        leaves (docs/transport.md, "Acknowledgement window")."""
        if self.tail is not None:
            return
        if self.micro_batches > 1:
            for m, cids in enumerate(self._micro_chunks(ids)):
                labels = self._targets[cids]
                self.send(Targets, self.last, rnd, step, labels=labels, micro=m, batch_rows=len(ids))
        else:
            self.send(Targets, self.last, rnd, step, labels=self._targets[ids])

    def _send_targets_ahead(self, rnd: int, after: tuple[int, torch.Tensor] | None) -> None:
        """The next step's targets (`after`: its step and sample ids; None after the last step)."""
        if after is not None:
            self._send_targets(rnd, *after)

    def _micro_chunks(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [c for c in torch.tensor_split(ids, min(self.micro_batches, len(ids))) if len(c)]

    def _step(
        self,
        rnd: int,
        step: int,
        ids: torch.Tensor,
        released_all: torch.Tensor | None,
        after: tuple[int, torch.Tensor] | None = None,
    ) -> float:
        """One unpipelined step; returns the chain's loss times the batch size. `after`: the next
        step of the round (its step and sample ids), whose targets go out while this one is away."""
        y = self.data.train_y[ids]
        a_rel = self._release(ids, released_all)
        self._send_activation(rnd, step, a_rel, train=True)
        self._send_targets_ahead(rnd, after)
        if self.tail is not None:
            self._tail_step(rnd, step, self._loss_labels(y, ids))
        reply = self._receive_grad(rnd, step, a_rel)
        if released_all is None and self.head_optimizer is not None:
            clear_grads(self.head_optimizer)
            a_rel.backward(from_wire(reply.grad))
            self._require_finite_head_grads(rnd, step)
            self.head_optimizer.step()
        return reply.loss * len(ids)

    def _pipelined_step(
        self,
        rnd: int,
        step: int,
        ids: torch.Tensor,
        released_all: torch.Tensor | None,
        after: tuple[int, torch.Tensor] | None = None,
    ) -> float:
        """One step as micro-batches (GPipe fill and drain): every micro-batch's Forward goes out before
        any gradient is awaited, so trainers work on different micro-batches at once; the head
        accumulates the gradients of all of them and steps once, as the trainers do."""
        chunks = self._micro_chunks(ids)
        released = []  # this step's targets went out before it (`_send_targets`)
        for m, cids in enumerate(chunks):
            a_rel = self._release(cids, released_all)
            self._send_activation(rnd, step, a_rel, train=True, micro=m, micros=len(chunks))
            released.append(a_rel)
        self._send_targets_ahead(rnd, after)
        trains = released_all is None and self.head_optimizer is not None
        if trains:
            clear_grads(self.head_optimizer)
        loss_sum, pending = 0.0, set(range(len(chunks)))
        for _ in chunks:
            reply: Backward = self._receive(Backward, rnd, step)
            if reply.micro not in pending:
                raise ProtocolError(
                    f"{self.name}: unexpected or repeated gradient for micro-batch {reply.micro}"
                )
            pending.discard(reply.micro)
            a_rel = released[reply.micro]
            self._check_grad(reply, a_rel)
            if trains:
                a_rel.backward(from_wire(reply.grad))
            loss_sum += reply.loss * len(a_rel)
        if trains:
            self._require_finite_head_grads(rnd, step)
            self.head_optimizer.step()
        return loss_sum

    def _require_finite_head_grads(self, rnd: int, step: int) -> None:
        grads = optimizer_grads(self.head_optimizer)
        where = f"{self.name}: step {(rnd, step)}: head weight gradients from {self.first}'s gradient"
        require_finite(grads, where=where)

    def _tail_step(self, rnd: int, step: int, y: torch.Tensor) -> None:
        """U-shaped: compute the loss on the returned features and send their gradient back."""
        feats = self._receive_output(rnd, step, len(y)).requires_grad_(True)
        self.tail.train()
        loss = F.cross_entropy(self.tail(feats), y)
        clear_grads(self.tail_optimizer)
        loss.backward()
        grads = [feats.grad, *optimizer_grads(self.tail_optimizer)]
        where = f"{self.name}: step {(rnd, step)}: tail gradients on {self.last}'s features"
        require_finite(grads, where=where)
        self.tail_optimizer.step()
        grad = to_wire(feats.grad, self.wire_dtype, where=f"{self.name}: gradient")
        self.send(Backward, self.last, rnd, step, grad=grad, loss=float(loss.detach()))

    def _end_round(self, rnd: int, steps: int, samples: int) -> None:
        for t in self.trainers:
            self.send(RoundEnd, t, rnd, steps, steps=steps, samples=samples)
        sealed = set()
        for _ in self.trainers:
            msg = self._receive(RoundSealed, rnd, steps)
            sealed.add(msg.header.sender)
        if sealed != set(self.trainers):
            raise ProtocolError(f"{self.name}: round {rnd} sealed by {sorted(sealed)}, not by every trainer")
        self.rounds_done = rnd + 1
        if self.checkpoint_dir is not None:
            self.save(round_prefix(self.checkpoint_dir, rnd))

    # -- inference --------------------------------------------------------
    def predict_logits(self, x: torch.Tensor, *, tag: object = "eval") -> torch.Tensor:
        """True-class logits for `x`, computed through the chain (inference relay)."""
        self.head.eval()
        outs = []
        for step, i in enumerate(range(0, len(x), self.eval_batch_size)):
            with torch.no_grad():
                a = self.head(x[i : i + self.eval_batch_size])
                if self.defence is not None:
                    a = self.defence.release(a, train=False)
            self._send_activation(self.rounds_done, step, a, train=False)
            out = self._receive_output(self.rounds_done, step, len(a))
            with torch.no_grad():
                if self.tail is not None:
                    self.tail.eval()
                    logits = self.tail(out)
                else:
                    logits = self.defence.decode_logits(out) if self.defence else out
            outs.append(logits)
        return torch.cat(outs)

    def evaluate(self, split: str = "test", *, tag: object = "eval") -> float:
        x, y = (
            (self.data.test_x, self.data.test_y)
            if split == "test"
            else (self.data.train_x, self.data.train_y)
        )
        pred = self.predict_logits(x, tag=tag).argmax(1)
        return float((pred == y).float().mean())

    # -- state ------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = module_optimizer_state(self.head, self.head_optimizer, "head.")
        if self.tail is not None:
            t2, m2 = module_optimizer_state(self.tail, self.tail_optimizer, "tail.")
            tensors.update(t2)
            meta.update(m2)
        meta.update(
            rounds_done=self.rounds_done,
            defence=self.defence.state_dict() if self.defence else None,
            seq=self.seq_state(),
        )
        return tensors, meta

    def save(self, prefix: Path) -> None:
        save_state(prefix, *self.state())

    def load(self, prefix: Path) -> None:
        tensors, meta = load_state(prefix)
        load_module_optimizer_state(self.head, self.head_optimizer, tensors, meta, "head.")
        if self.tail is not None:
            load_module_optimizer_state(self.tail, self.tail_optimizer, tensors, meta, "tail.")
        self.rounds_done = meta["rounds_done"]
        if self.defence is not None and meta.get("defence") is not None:
            self.defence.load_state_dict(meta["defence"])
        self.load_seq_state(meta.get("seq"))
