"""A trainer client: holds one model segment and relays activations and gradients.

It never sees raw inputs, true labels, or the label codebook: it receives
(possibly noised) activations from its predecessor, gradients from its
successor, and, if it is the last trainer, pseudo-labels from the data owner.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from clicooper.checkpoint import load_module_optimizer_state, load_state, module_optimizer_state, save_state
from clicooper.checkpoint import round_prefix as _round_prefix
from clicooper.parties.base import (
    Party,
    ProtocolError,
    check_tensor,
    clear_grads,
    optimizer_grads,
    require_finite,
)
from clicooper.schedule import RoundLr, set_lr
from clicooper.transport.base import Transport
from clicooper.transport.messages import (
    Backward,
    FinalSegment,
    Forward,
    Message,
    Nonce,
    Output,
    Register,
    Rewind,
    RoundEnd,
    RoundSealed,
    StageSealed,
    Targets,
)
from clicooper.transport.precision import from_wire, to_wire

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TrainerHooks(Protocol):
    """Per-trainer provenance duties (clicooper.provenance.stage.StageProvenance)."""

    def registration(self) -> dict: ...
    def open_round(self, rnd: int, nonce: bytes, links: list[str], segment: nn.Module) -> None: ...
    def add_regulariser_grad(self, segment: nn.Module) -> None: ...
    def prepare_regulariser_grad(self, segment: nn.Module) -> None: ...
    def observe(self, neighbour: str, direction: str, rnd: int, step: int, tensor: torch.Tensor) -> None: ...
    def seal(self, segment: nn.Module, rnd: int, steps: int, samples: int) -> tuple[str, str]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


MAX_MICROS = 1024  # micro-batches per step a peer may announce (config: training.micro_batches)


@dataclass
class _InFlight:
    inputs: torch.Tensor
    outputs: torch.Tensor


@dataclass
class _Accumulating:
    """A step whose micro-batches are still coming back: gradients accumulate until all are in."""

    micros: int
    forwarded: int = 0
    backwarded: int = 0


class Trainer(Party):
    def __init__(
        self,
        *,
        name: str,
        position: int,
        job_id: str,
        transport: Transport,
        segment: nn.Module,
        optimizer: torch.optim.Optimizer,
        prev: str,
        next: str | None,
        data_owner: str,
        input_shape: tuple[int, ...],
        num_outputs: int | None = None,
        u_shaped: bool = False,
        hooks: TrainerHooks | None = None,
        verifier: str | None = None,
        checkpoint_dir: Path | None = None,
        lr_schedule: RoundLr | None = None,
        rounds: int | None = None,
        wire_dtype: torch.dtype = torch.float32,
        upstream_grad_first: bool = False,
    ) -> None:
        super().__init__(name, job_id, transport)
        self.position = position
        # send the upstream gradient before computing the weight gradients (`_backward_and_step`)
        self.upstream_grad_first = upstream_grad_first
        self.wire_dtype = wire_dtype  # activations, gradients, outputs travel in it (transport/precision.py)
        self.rounds = rounds  # with a verifier: after sealing the last round, deliver the segment to it
        self.lr_schedule = lr_schedule
        self.segment = segment
        self._training_mode: bool | None = None  # the mode this trainer last set on its segment
        self.optimizer = optimizer
        self.prev, self.next, self.data_owner = prev, next, data_owner
        self.is_last = next is None
        self.u_shaped = u_shaped
        self.input_shape = tuple(input_shape)
        self.num_outputs = num_outputs
        self.hooks = hooks
        self.verifier = verifier
        if (hooks is None) != (verifier is None):
            raise ValueError(f"{name}: provenance hooks and a verifier go together")
        self.checkpoint_dir = checkpoint_dir
        self.start_incarnation(checkpoint_dir)
        self._inflight: dict[tuple[int, int, int], _InFlight] = {}  # (round, step, micro)
        self._targets: dict[tuple[int, int, int], tuple[torch.Tensor, int]] = {}  # labels, step rows
        self._steps: dict[tuple[int, int], _Accumulating] = {}
        self._last_train_step: tuple[int, int] = (-1, -1)
        self.round_steps = 0
        self.round_samples = 0
        self.rounds_sealed = 0
        downstream = data_owner if self.is_last and u_shaped else next
        self._allowed: dict[type[Message], tuple[str, ...]] = {
            Forward: (prev,),
            RoundEnd: (data_owner,),
            Rewind: (data_owner,),
        }
        self._initial = self._snapshot()  # what a rewind to round 0 restores
        # A trainer started again as its own program may have missed steps: it trains again only
        # once the data owner has rewound the job to a round every party completed.
        self.awaiting_rewind = False
        self.awaiting_rewind_why = ""  # set with it (`wait_for_rewind`)
        if downstream is not None:
            self._allowed[Backward] = (downstream,)
        if self.is_last and not u_shaped:
            self._allowed[Targets] = (data_owner,)
        if verifier is not None:
            self._allowed[Nonce] = (verifier,)
        transport.register(name, self.handle)

    # -- message handling -------------------------------------------------
    def handle(self, msg: Message) -> None:
        self.check_incoming(msg, self._allowed)
        if self.awaiting_rewind and isinstance(msg, (Forward, Targets, Backward, RoundEnd)):
            raise ProtocolError(
                f"{self.name}: {self.awaiting_rewind_why}; waiting for {self.data_owner} to rewind the job"
            )
        if isinstance(msg, Forward):
            self._on_forward(msg)
        elif isinstance(msg, Targets):
            self._on_targets(msg)
        elif isinstance(msg, Backward):
            self._on_backward(msg)
        elif isinstance(msg, RoundEnd):
            self._on_round_end(msg)
        elif isinstance(msg, Nonce):
            self._on_nonce(msg)
        elif isinstance(msg, Rewind):
            self._on_rewind(msg)

    def register_with_verifier(self) -> None:
        """Send identity and escrowed watermark key to the verifier (before any round opens)."""
        if self.hooks is not None and self.verifier is not None:
            self.send(Register, self.verifier, 0, 0, **self.hooks.registration())

    def _on_nonce(self, msg: Nonce) -> None:
        try:
            nonce = bytes.fromhex(msg.nonce)
            links = json.loads(msg.links)
        except (ValueError, RecursionError):
            raise ProtocolError(f"{self.name}: malformed nonce message from {msg.header.sender}") from None
        if (
            len(nonce) < 16
            or not isinstance(links, list)
            or not all(isinstance(x, str) and _HEX64.match(x) for x in links)
        ):
            raise ProtocolError(f"{self.name}: nonce must be >= 16 bytes and links a list of SHA-256 digests")
        self.hooks.open_round(msg.header.round, nonce, links, self.segment)

    def _observe(self, neighbour: str, direction: str, msg_key: tuple[int, int], t: torch.Tensor) -> None:
        if self.hooks is not None:
            self.hooks.observe(neighbour, direction, msg_key[0], msg_key[1], t)

    def _on_forward(self, msg: Forward) -> None:
        key = (msg.header.round, msg.header.step)
        check_tensor(
            msg.activation,
            where=f"{self.name}: forward from {self.prev}",
            dtype=self.wire_dtype,
            shape=(None, *self.input_shape),
        )
        x = from_wire(msg.activation)
        if not msg.train:
            self._set_mode(False)
            with torch.no_grad():
                out = self.segment(x)
            self._emit_forward(key, out, train=False)
            return
        if x.shape[0] == 0:  # the data owner skips empty batches: a loss over none is NaN
            raise ProtocolError(f"{self.name}: empty training batch from {self.prev} for step {key}")
        self._start_micro(key, msg.micro, msg.micros)
        self._observe(self.prev, "in", key, msg.activation)
        self._set_mode(True)
        x = x.requires_grad_(True)
        out = self.segment(x)
        self.round_samples += x.shape[0]
        mkey = (*key, msg.micro)
        if self.is_last and not self.u_shaped:
            targets, rows = self._targets.pop(mkey, (None, 0))
            if targets is None:
                where = f"{key} micro-batch {msg.micro}" if msg.micros > 1 else f"{key}"
                raise ProtocolError(f"{self.name}: no targets from {self.data_owner} for step {where}")
            if targets.shape[0] != out.shape[0] or rows < 0 or (rows and rows < out.shape[0]):
                raise ProtocolError(f"{self.name}: {targets.shape[0]} targets for a batch of {out.shape[0]}")
            loss = F.cross_entropy(out, targets)
            weighted = loss * (out.shape[0] / rows) if rows else loss  # a micro-batch's share of the step
            self._backward_and_step(mkey, x, weighted, float(loss.detach()))
            return
        self._inflight[mkey] = _InFlight(x, out)
        self._emit_forward(key, out, train=True, micro=msg.micro, micros=msg.micros)

    def _set_mode(self, train: bool) -> None:
        """Training or evaluation mode, set only when it changes: `Module.train` walks every submodule
        (tens of microseconds a call in a running chain, a call a step). Set again when anything else
        changed the segment's own flag since."""
        if self._training_mode is not train or self.segment.training is not train:
            self.segment.train(train)
            self._training_mode = train

    def _start_micro(self, key: tuple[int, int], micro: int, micros: int) -> None:
        """Order checks for a training Forward: steps in increasing order, and within a pipelined step
        its micro-batches 0..micros-1 in order; the step is counted (and the round's learning rate set)
        at its first micro-batch."""
        acc = self._steps.get(key)
        if acc is None:
            if key <= self._last_train_step:
                raise ProtocolError(f"{self.name}: training step {key} arrived after {self._last_train_step}")
            if not 1 <= micros <= MAX_MICROS or micro != 0:
                raise ProtocolError(f"{self.name}: step {key} starts with micro-batch {micro} of {micros}")
            if self.lr_schedule is not None and key[0] != self._last_train_step[0]:
                set_lr(self.optimizer, self.lr_schedule(key[0]))  # the first training step of a round
            self._last_train_step = key
            acc = self._steps[key] = _Accumulating(micros)
            self.round_steps += 1
        elif micros != acc.micros or micro != acc.forwarded or micro >= micros:
            raise ProtocolError(
                f"{self.name}: step {key}: micro-batch {micro} of {micros} "
                f"after {acc.forwarded} of {acc.micros}"
            )
        acc.forwarded += 1

    def _emit_forward(
        self, key: tuple[int, int], out: torch.Tensor, *, train: bool, micro: int = 0, micros: int = 1
    ) -> None:
        wire = to_wire(out, self.wire_dtype, where=f"{self.name}: output")
        if self.is_last:
            self.send(Output, self.data_owner, *key, output=wire, train=train)
        else:
            if train:
                self._observe(self.next, "out", key, wire)
            self.send(Forward, self.next, *key, activation=wire, train=train, micro=micro, micros=micros)

    def _on_targets(self, msg: Targets) -> None:
        key = (msg.header.round, msg.header.step, msg.micro)
        check_tensor(msg.labels, where=f"{self.name}: targets", dtype=torch.int64, shape=(None,))
        n_out = self.num_outputs or 0
        if msg.labels.numel() == 0:
            raise ProtocolError(f"{self.name}: empty targets for step {key}")
        if int(msg.labels.min()) < 0 or int(msg.labels.max()) >= n_out:
            raise ProtocolError(f"{self.name}: target labels outside 0..{n_out - 1}")
        if key in self._targets:
            raise ProtocolError(f"{self.name}: duplicate targets for step {key}")
        self._targets[key] = (msg.labels, msg.batch_rows)

    def _on_backward(self, msg: Backward) -> None:
        key = (msg.header.round, msg.header.step, msg.micro)
        state = self._inflight.pop(key, None)
        if state is None:
            raise ProtocolError(f"{self.name}: gradient for unknown step {key} from {msg.header.sender}")
        check_tensor(
            msg.grad,
            where=f"{self.name}: gradient from {msg.header.sender}",
            dtype=self.wire_dtype,
            shape=tuple(state.outputs.shape),
        )
        self._observe(msg.header.sender, "in", key[:2], msg.grad)
        self._backward_and_step(key, state.inputs, state.outputs, msg.loss, from_wire(msg.grad))

    def _backward_and_step(
        self,
        key: tuple[int, int, int],
        x: torch.Tensor,
        out: torch.Tensor,
        report: float,
        grad_out: torch.Tensor | None = None,
    ) -> None:
        """Back-propagate (`out` with upstream gradient `grad_out`, or `out` as the loss) and send dL/dx
        upstream. Gradients accumulate over a step's micro-batches: the optimiser is zeroed at the
        step's first backward (which also adds this trainer's own regulariser, once per step, as
        unpipelined) and steps at its last.

        With `upstream_grad_first`, dL/dx is computed alone (`autograd.grad`, which skips every weight
        gradient) and sent before the weight gradients are computed (a second pass over the graph,
        accumulating into the parameters only): the parties upstream then work while this one
        finishes, which pays where parties run concurrently. Every gradient is computed by the same
        kernels from the same tensors either way, so the weights are the same
        (`tests/test_upstream_grad_first.py`). What differs is when a failure shows: weight gradients
        that overflow are found after dL/dx has left. The step is refused here all the same, and this
        trainer then refuses all training traffic until the data owner rewinds the job."""
        step = key[:2]
        acc = self._steps[step]
        first = acc.backwarded == 0
        if first:
            clear_grads(self.optimizer)
        grads = None if grad_out is None else [grad_out]
        cause = f"{self.next}'s gradient" if grad_out is not None else f"the loss on {self.prev}'s output"
        where = f"{self.name}: step {step}"
        if self.upstream_grad_first:
            (gx,) = torch.autograd.grad(
                [out], [x], grads, retain_graph=True, allow_unused=True, materialize_grads=True
            )
            require_finite([gx], where=f"{where}: the gradient for {self.prev}, from {cause}")
            self._send_upstream(key, gx, report)
            try:
                if params := self._trained_params():
                    torch.autograd.backward([out], grads, inputs=params)
                self._accumulate_and_step(acc, first, step, f"{where}: weight gradients from {cause}")
            except Exception:
                # the chain upstream already has this step's gradient and may go on
                self.wait_for_rewind(f"step {step} failed after its upstream gradient had left")
                raise
            return
        torch.autograd.backward([out], grads)
        gx = x.grad if x.grad is not None else torch.zeros_like(x)
        require_finite([gx], where=f"{where}: the gradient for {self.prev}, from {cause}")
        self._accumulate_and_step(acc, first, step, f"{where}: weight gradients from {cause}")
        self._send_upstream(key, gx, report)

    def _accumulate_and_step(
        self, acc: _Accumulating, first: bool, step: tuple[int, int], where: str
    ) -> None:
        """After a micro-batch's weight gradients: add the regulariser (a step's first), and at the
        step's last micro-batch check the accumulated gradients and step."""
        if first and self.hooks is not None:
            self.hooks.add_regulariser_grad(self.segment)
        acc.backwarded += 1
        if acc.backwarded == acc.micros:
            require_finite(optimizer_grads(self.optimizer), where=where)
            self.optimizer.step()
            del self._steps[step]
            if self.hooks is not None:
                self.hooks.prepare_regulariser_grad(self.segment)

    def _send_upstream(self, key: tuple[int, int, int], grad: torch.Tensor, report: float) -> None:
        step = key[:2]
        grad = to_wire(grad, self.wire_dtype, where=f"{self.name}: gradient")
        self._observe(self.prev, "out", step, grad)
        self.send(Backward, self.prev, *step, grad=grad, loss=report, micro=key[2])

    def _trained_params(self) -> list[torch.Tensor]:
        """The parameters this trainer's optimiser steps (those that take gradients)."""
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]

    def _on_round_end(self, msg: RoundEnd) -> None:
        rnd = msg.header.round
        if self._inflight or self._targets or self._steps:
            raise ProtocolError(
                f"{self.name}: round {rnd} ended with {len(self._inflight) or len(self._steps)} "
                f"steps in flight and {len(self._targets)} targets unused"
            )
        if self.hooks is not None:
            record, attestations = self.hooks.seal(self.segment, rnd, self.round_steps, self.round_samples)
            self.send(
                StageSealed, self.verifier, rnd, msg.header.step, record=record, attestations=attestations
            )
            if self.rounds is not None and rnd + 1 >= self.rounds:
                self.deliver_segment(rnd)
        self.rounds_sealed = rnd + 1
        if self.checkpoint_dir is not None:
            self.save(_round_prefix(self.checkpoint_dir, rnd))
        self.round_steps = self.round_samples = 0
        self.send(RoundSealed, self.data_owner, rnd, msg.header.step)

    def _snapshot(self) -> tuple[dict, dict]:
        tensors, meta = self.state()
        return {k: v.detach().clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))

    def _on_rewind(self, msg: Rewind) -> None:
        """Go back to the state after round `header.round - 1` (the initial state for round 0)."""
        rnd = msg.header.round
        self._forget_round_work()
        if rnd == 0:
            tensors, meta = self._initial
            load_module_optimizer_state(self.segment, self.optimizer, tensors, meta)
            self.rounds_sealed, self._last_train_step = 0, (-1, -1)
            if self.hooks is not None:
                self.hooks.load_state_dict(meta["hooks"])
            return
        if self.checkpoint_dir is None:
            raise ProtocolError(f"{self.name}: cannot rewind to round {rnd} without checkpoints")
        seq_in = dict(self._seq_in)
        try:
            self.load(_round_prefix(self.checkpoint_dir, rnd - 1))
        except (OSError, ValueError, KeyError) as e:
            raise ProtocolError(f"{self.name}: cannot rewind to round {rnd}: {e}") from None
        self._seq_in = seq_in  # what this party accepted since is still accepted: no replays

    def wait_for_rewind(self, why: str) -> None:
        """Refuse all training traffic (naming `why`) until the data owner rewinds the job."""
        self.awaiting_rewind, self.awaiting_rewind_why = True, why

    def _forget_round_work(self) -> None:
        """Drop what a round left half done (steps in flight, targets sent ahead, micro-batches
        accumulating): a rewound or loaded party starts at a round's beginning, and no longer waits
        to be rewound."""
        self.awaiting_rewind = False
        self._inflight.clear()
        self._targets.clear()
        self._steps.clear()
        self.round_steps = self.round_samples = 0

    def deliver_segment(self, rnd: int) -> None:
        """Send the segment as sealed in round `rnd` to the verifier (a safetensors blob)."""
        from safetensors.torch import save as save_safetensors

        state = self.segment.state_dict()
        blob = save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()})
        weights = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        self.send(FinalSegment, self.verifier, rnd, 0, weights=weights)

    # -- state ------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = module_optimizer_state(self.segment, self.optimizer)
        meta.update(
            name=self.name,
            position=self.position,
            rounds_sealed=self.rounds_sealed,
            last_train_step=list(self._last_train_step),
            hooks=self.hooks.state_dict() if self.hooks is not None else None,
            seq=self.seq_state(),
        )
        return tensors, meta

    def save(self, prefix: Path) -> None:
        save_state(prefix, *self.state())

    def load(self, prefix: Path) -> None:
        tensors, meta = load_state(prefix)
        _check_meta(prefix, meta)
        if meta["position"] != self.position:
            raise ValueError(f"{prefix}: checkpoint is for position {meta['position']}, not {self.position}")
        load_module_optimizer_state(self.segment, self.optimizer, tensors, meta)
        self._forget_round_work()  # a checkpoint is a round's end: a resume on this object restarts
        self.rounds_sealed = meta["rounds_sealed"]
        self._last_train_step = tuple(meta["last_train_step"])  # type: ignore[assignment]
        if self.hooks is not None and meta.get("hooks") is not None:
            self.hooks.load_state_dict(meta["hooks"])
        self.load_seq_state(meta.get("seq"))


def _check_meta(prefix: Path, meta: dict) -> None:
    """The types of a checkpoint's bookkeeping (its JSON is not covered by the tensors' SHA-256): a
    wrong one is refused here, where a resume falls back to an earlier round, not at the next step."""

    def counter(v: object) -> bool:
        return type(v) is int and v >= -1

    step = meta.get("last_train_step")
    if not (
        counter(meta.get("position"))
        and counter(meta.get("rounds_sealed"))
        and isinstance(step, list)
        and len(step) == 2
        and all(counter(v) for v in step)
    ):
        fields = "position, rounds_sealed, last_train_step"
        raise ValueError(f"{prefix}: checkpoint bookkeeping ({fields}) is malformed")
