"""The parties of a job, each in its own module; they talk only through a Transport."""

from clicooper.parties.base import Party, ProtocolError
from clicooper.parties.data_owner import DataOwner
from clicooper.parties.trainer import Trainer
from clicooper.parties.verifier import Verifier, verify_run

__all__ = ["DataOwner", "Party", "ProtocolError", "Trainer", "Verifier", "verify_run"]
