"""Typed messages, the raw-bytes codec, and transports (in-process)."""

from clicooper.transport.base import Transport, TransportError
from clicooper.transport.codec import CodecError, copy_message, decode, encode, encode_frame
from clicooper.transport.inproc import InProcTransport
from clicooper.transport.messages import (
    Backward,
    Forward,
    Header,
    Message,
    Output,
    RoundEnd,
    RoundSealed,
    Targets,
)

__all__ = [
    "Backward",
    "CodecError",
    "Forward",
    "Header",
    "InProcTransport",
    "Message",
    "Output",
    "RoundEnd",
    "RoundSealed",
    "Targets",
    "Transport",
    "TransportError",
    "copy_message",
    "decode",
    "encode",
    "encode_frame",
]
