"""The public job manifest and each party's private identity folder.

A manifest (`manifest.json`) is what every party of a job may read: the job's settings (model,
cuts, training, privacy mechanism, watermark), the public facts about the data the architecture
is sized from (input shape, number of classes), and the roster: every party's name, role, position,
Ed25519 public key, TLS identity and (optionally) address, plus the CA certificate that signed
the parties' TLS certificates. It holds no secret.

An identity folder is private to one party:

    party.json            name, role, job (public, for convenience)
    identity.pem          Ed25519 signing key (trainers, verifier; mode 0600)
    watermark.key         watermark key, hex (trainers; mode 0600)
    tls/ca.pem, cert.pem, key.pem   the party's TLS credentials (key.pem mode 0600)

`make_job` writes a manifest and one identity folder per party, with a local CA (for one machine
or a lab; the CA key goes to `ca/` and should be kept offline). Keys come from OS entropy only.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clicooper.checkpoint import atomic_write_bytes, atomic_write_json
from clicooper.config import JobConfig
from clicooper.provenance import Identity, new_watermark_key

FORMAT = "clicooper-manifest/1"
MANIFEST_FILE = "manifest.json"
DATA_OWNER, VERIFIER = "data_owner", "verifier"
Role = Literal["data_owner", "trainer", "verifier"]


class ManifestError(ValueError):
    """A manifest or identity folder is missing, malformed, or does not match the other."""


class PartyEntry(BaseModel):
    """One party in the roster. `position`: 0 the data owner, 1..n the trainers, n+1 the verifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    role: Role
    position: int = Field(ge=0)
    public_key: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # Ed25519, hex
    tls_identity: str | None = None  # the URI name in its certificate: clicooper://<job>/<party>
    address: str | None = None  # host:port, where known in advance


class JobManifest(BaseModel):
    """A job's public description; see the module docstring."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["clicooper-manifest/1"] = FORMAT
    job_id: str = Field(min_length=1, max_length=200)
    config: JobConfig
    input_shape: tuple[int, ...]
    num_classes: int = Field(ge=2)
    parties: tuple[PartyEntry, ...]
    ca_cert: str | None = None  # PEM

    @model_validator(mode="after")
    def _consistent(self) -> JobManifest:
        if self.config.privacy.secret_seed is not None:
            raise ValueError(
                "privacy.secret_seed is the data owner's secret and cannot be in a public manifest"
            )
        names = [p.name for p in self.parties]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate party names in the roster: {names}")
        owners = [p for p in self.parties if p.role == "data_owner"]
        if len(owners) != 1 or owners[0].position != 0:
            raise ValueError("the roster needs exactly one data owner, at position 0")
        trainers = self.trainer_entries
        if [t.position for t in trainers] != list(range(1, len(trainers) + 1)):
            raise ValueError("trainer positions must be 1..n")
        if not trainers:
            raise ValueError("the roster has no trainer")
        verifiers = [p for p in self.parties if p.role == "verifier"]
        if len(verifiers) != int(self.config.watermark.enabled):
            raise ValueError(
                "a watermarked job needs exactly one verifier (and only a watermarked job has one)"
            )
        for p in [*trainers, *verifiers]:
            if p.public_key is None:
                raise ValueError(f"{p.name} has no public key in the roster")
        return self

    # -- views --------------------------------------------------------------
    @property
    def trainer_entries(self) -> list[PartyEntry]:
        return sorted((p for p in self.parties if p.role == "trainer"), key=lambda p: p.position)

    @property
    def trainer_names(self) -> list[str]:
        return [p.name for p in self.trainer_entries]

    @property
    def verifier(self) -> str | None:
        return next((p.name for p in self.parties if p.role == "verifier"), None)

    def party(self, name: str) -> PartyEntry:
        for p in self.parties:
            if p.name == name:
                return p
        raise ManifestError(f"{name!r} is not in the roster of job {self.job_id!r}")

    def public_keys(self) -> dict[str, bytes]:
        return {p.name: bytes.fromhex(p.public_key) for p in self.parties if p.public_key is not None}

    def addresses(self) -> dict[str, str]:
        return {p.name: p.address for p in self.parties if p.address}

    def roster(self):
        """The transport's roster (who may talk to whom) for this job."""
        from clicooper.transport.grpc.roster import Roster

        return Roster(
            self.job_id,
            tuple(self.trainer_names),
            data_owner=DATA_OWNER,
            verifier=self.verifier,
            u_shaped=self.config.privacy.u_shaped,
        )

    # -- files --------------------------------------------------------------
    def save(self, path: Path) -> None:
        atomic_write_bytes(path, (self.model_dump_json(indent=2) + "\n").encode())

    @classmethod
    def load(cls, path: str | Path) -> JobManifest:
        path = Path(path)
        try:
            raw = path.read_bytes()
            if len(raw) > 16 * 1024 * 1024:
                raise ManifestError(f"{path} is implausibly large for a job manifest")
            return cls.model_validate_json(raw)
        except OSError as e:
            raise ManifestError(f"cannot read the job manifest {path}: {e.strerror or e}") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ManifestError(f"{path} is not a valid job manifest: {where}: {first['msg']}") from None

    def with_config(self, **sections: dict) -> JobManifest:
        """The same roster under changed settings (for instance `launch local --quick`)."""
        return self.model_copy(update={"config": self.config.replace(**sections)})


@dataclass
class PartyKeys:
    """One party's private material, as loaded from (or made for) its identity folder."""

    name: str
    role: Role
    identity: Identity | None = None  # Ed25519 signing key: trainers and the verifier
    wm_key: bytes | None = None  # watermark key: trainers
    tls: object | None = None  # TlsCredentials, where the party talks over gRPC

    @classmethod
    def create(cls, name: str, role: Role, *, watermark: bool = True) -> PartyKeys:
        """Fresh keys from OS entropy (never from a seed)."""
        identity = Identity.generate(name) if role != "data_owner" else None
        wm = new_watermark_key() if role == "trainer" and watermark else None
        return cls(name, role, identity, wm)

    def save(self, folder: Path, job_id: str) -> None:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(folder / "party.json", {"name": self.name, "role": self.role, "job_id": job_id})
        if self.identity is not None:
            self.identity.save(folder / "identity.pem")
        if self.wm_key is not None:
            atomic_write_bytes(folder / "watermark.key", self.wm_key.hex().encode(), mode=0o600)
        if self.tls is not None:
            from clicooper.transport.grpc.tls import save_credentials

            save_credentials(self.tls, folder / "tls")

    @classmethod
    def load(cls, folder: str | Path, manifest: JobManifest | None = None) -> PartyKeys:
        """Read an identity folder; with a manifest, check it belongs to this job and that its
        public key is the one in the roster."""
        folder = Path(folder)
        try:
            info = json.loads((folder / "party.json").read_text())
            name, role = str(info["name"]), str(info["role"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{folder} is not a party identity folder (party.json: {e})") from None
        if role not in ("data_owner", "trainer", "verifier"):
            raise ManifestError(f"{folder}/party.json: unknown role {role!r}")
        keys = cls(name, role)  # type: ignore[arg-type]
        try:
            if (folder / "identity.pem").exists():
                keys.identity = Identity.load(folder / "identity.pem", name=name)
            if (folder / "watermark.key").exists():
                keys.wm_key = bytes.fromhex((folder / "watermark.key").read_text().strip())
            if (folder / "tls").is_dir():
                from clicooper.transport.grpc.tls import TlsCredentials

                keys.tls = TlsCredentials.load(folder / "tls")
        except (OSError, ValueError) as e:
            raise ManifestError(f"{folder}: {e}") from None
        if manifest is not None:
            keys.check(manifest)
        return keys

    @classmethod
    def load_or_create(
        cls, folder: Path | None, name: str, role: Role, *, watermark: bool = True
    ) -> PartyKeys:
        """For the in-process simulation: keys kept in the party's folder of the run, so that a
        resumed job keeps them (in memory only without a folder)."""
        if folder is not None and (folder / "party.json").exists():
            return cls.load(folder)
        keys = cls(name, role)
        if folder is not None and (folder / "identity.pem").exists():  # a run made before party.json
            keys.identity = Identity.load(folder / "identity.pem", name=name)
        elif role != "data_owner":
            keys.identity = Identity.generate(name)
        if role == "trainer" and watermark:
            path = folder / "watermark.key" if folder is not None else None
            if path is not None and path.exists():
                keys.wm_key = bytes.fromhex(path.read_text().strip())
            else:
                keys.wm_key = new_watermark_key()
        if folder is not None:
            keys.save(folder, "")
        return keys

    def check(self, manifest: JobManifest) -> None:
        entry = manifest.party(self.name)
        if entry.role != self.role:
            raise ManifestError(f"{self.name} is a {entry.role} in the manifest, not a {self.role}")
        if entry.public_key is not None and (
            self.identity is None or self.identity.public_key_bytes().hex() != entry.public_key
        ):
            raise ManifestError(f"{self.name}'s signing key is not the one the manifest names")
        if self.tls is not None:
            job, name = self.tls.identity()
            if name != self.name or job not in (None, manifest.job_id):
                raise ManifestError(f"{self.name}'s TLS certificate names {name!r} in job {job!r}")
        if self.role == "trainer" and manifest.config.watermark.enabled and self.wm_key is None:
            raise ManifestError(f"{self.name} has no watermark key")


def party_names(n_trainers: int, watermark: bool) -> list[tuple[str, Role, int]]:
    out: list[tuple[str, Role, int]] = [(DATA_OWNER, "data_owner", 0)]
    out += [(f"trainer_{i}", "trainer", i) for i in range(1, n_trainers + 1)]
    if watermark:
        out.append((VERIFIER, "verifier", n_trainers + 1))
    return out


def new_job_id(cfg: JobConfig) -> str:
    return f"{cfg.job.name[:40]}-{secrets.token_hex(4)}"


def build_manifest(
    cfg: JobConfig,
    job_id: str,
    input_shape: Iterable[int],
    num_classes: int,
    keys: dict[str, PartyKeys],
    *,
    ca_cert: bytes | None = None,
    addresses: dict[str, str] | None = None,
) -> JobManifest:
    """A manifest from the job's settings and the parties' public keys (a reproducible-experiment
    `secret_seed` is the data owner's and is left out)."""
    from clicooper.transport.grpc.tls import party_uri

    if cfg.privacy.secret_seed is not None:
        cfg = cfg.replace(privacy={"secret_seed": None})
    entries = []
    for name, role, pos in party_names(cfg.model.n_trainers, cfg.watermark.enabled):
        k = keys[name]
        entries.append(
            PartyEntry(
                name=name,
                role=role,
                position=pos,
                public_key=k.identity.public_key_bytes().hex() if k.identity is not None else None,
                tls_identity=party_uri(job_id, name) if k.tls is not None else None,
                address=(addresses or {}).get(name),
            )
        )
    # `cfg` was validated when it was made; code may pair it with a model it builds itself (the
    # benchmarks' deep MLP), so the architecture check of a config file is not repeated here.
    # A manifest read from disk (`JobManifest.load`) is always checked in full.
    return JobManifest.model_validate(
        {
            "job_id": job_id,
            "config": cfg,
            "input_shape": tuple(input_shape),
            "num_classes": num_classes,
            "parties": tuple(entries),
            "ca_cert": ca_cert.decode() if ca_cert else None,
        },
        context={"programmatic": True},
    )


def make_job(
    cfg: JobConfig,
    out: Path,
    *,
    input_shape: Iterable[int],
    num_classes: int,
    job_id: str | None = None,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1"),
) -> JobManifest:
    """Keys for a deployment on one machine or in a lab: a local CA (`out/ca/`), one identity folder
    per party (`out/<party>/`, each holding only that party's private keys) and the public
    manifest (`out/manifest.json`). Refuses to overwrite an existing folder's keys."""
    from clicooper.transport.grpc.tls import LocalCA

    job_id = job_id or new_job_id(cfg)
    roster = party_names(cfg.model.n_trainers, cfg.watermark.enabled)
    existing = [str(out / n) for n, _, _ in roster if (out / n).exists()] + [
        str(p) for p in (out / "ca", out / MANIFEST_FILE) if p.exists()
    ]
    if existing:
        raise ManifestError(f"{', '.join(existing)} exist(s); refusing to overwrite keys")
    ca = LocalCA.create(f"CliCooper CA for {job_id}")
    keys = {}
    for name, role, _ in roster:
        k = PartyKeys.create(name, role, watermark=cfg.watermark.enabled)
        k.tls = ca.issue(job_id, name, hosts=hosts)
        k.save(out / name, job_id)
        keys[name] = k
    ca.save(out / "ca")
    manifest = build_manifest(cfg, job_id, input_shape, num_classes, keys, ca_cert=ca.cert_pem)
    manifest.save(out / MANIFEST_FILE)
    return manifest
