"""CliCooper: client-cooperative split learning.

A data owner with private data and little compute has a model trained by a chain of
trainer clients, without showing them its inputs or labels; every trainer gets a
signed, verifiable record of its work and of its share in the model.
"""

__version__ = "0.1.0"
