"""Command-line interface: `clicooper demo | run | baseline | bench | datasets | keys | serve | launch |
verify | eval`.

Exit codes: 0 success (a VERIFIED chain, a MATCH, a valid certificate); 2 a user error, printed as
`error: ...` (bad config, data or input file, a run that cannot start or resume); 3 the verifier
REJECTED the job; 4 an ownership query found no match; 5 a certificate does not verify.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from clicooper.allocator import keep_freed_memory
from clicooper.bench.cli import bench_app
from clicooper.checkpoint import CheckpointError
from clicooper.config import NO_DEFENCES, ConfigError, JobConfig, load_config, parse_config
from clicooper.data import DatasetSplits
from clicooper.job import ChainJob, RunSummary, new_run_dir, prepare_data, train_centralized
from clicooper.parties.base import ProtocolError
from clicooper.privacy.accounting import BudgetExceeded
from clicooper.privacy.release_store import ReleaseStoreError
from clicooper.threads import apply_threads

EXIT_USAGE, EXIT_REJECTED, EXIT_NO_MATCH, EXIT_BAD_CERTIFICATE = 2, 3, 4, 5
EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by SIGINT: not a finished job

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(bench_app, name="bench")
verify_app = typer.Typer(no_args_is_help=True, help="The verifier: check a job, or an ownership claim.")
app.add_typer(verify_app, name="verify")
attack_app = typer.Typer(no_args_is_help=True, help="Run one attack against one configured job.")
app.add_typer(attack_app, name="attack")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluations: reports with the undefended baseline beside.")
app.add_typer(eval_app, name="eval")
serve_app = typer.Typer(no_args_is_help=True, help="Run one party of a job as its own program (gRPC + mTLS).")
app.add_typer(serve_app, name="serve")
launch_app = typer.Typer(no_args_is_help=True, help="Start every party of a job as separate processes.")
app.add_typer(launch_app, name="launch")
console = Console()

# Label DP of the defended job (randomized response with a prior), chosen from the measurements in
# EXPERIMENTS.md, section 7: the matrix's "+ label DP" rows use it. Not in DEMO: with activation DP on,
# label DP on top put the defended model at chance, on these defaults and on a trial merge with the
# newer ones (measured there); to be switched on once the defended model tolerates noisy labels.
DEFAULT_LABEL_EPSILON = 2.0
# The default job: full defences at the paper's setting (epsilon = 2, gamma = 2) and chained
# watermarking. Chosen from the frontier in EXPERIMENTS.md ("learning from the release"): the head
# is pre-trained locally and frozen, its 16-number unit-norm embedding is released once, and the
# trainers' linear segments learn from that release over many (privacy-free) epochs with a
# decaying learning rate.
DEMO = {
    "job": {"name": "demo"},
    "data": {"dataset": "fashion-mnist"},
    "model": {
        "arch": "small-cnn-dp",
        "n_trainers": 3,
        "cut_points": [1, 2, 3],
        "head_pretrain_epochs": 3,
        "freeze_head": True,
    },
    "training": {"epochs": 10, "batch_size": 512, "optimizer": "adam", "lr": 1e-3, "lr_schedule": "cosine"},
    "privacy": {"dp": True, "epsilon": 2.0, "delta": 1e-5, "release": "one-shot", "gamma": 2},
    "watermark": {"enabled": True},
}
# The quick demo: 40,000 images, one epoch of head pre-training, five on the release (passes over a
# one-shot release cost no privacy and about a second each). The subset must be large enough to learn
# from an epsilon = 2 release: the read-out rests on class means of noised samples, whose error shrinks
# like 1/sqrt(samples per class); on 20,000 images with three epochs it ended at 0.77-0.79
# (EXPERIMENTS.md, section 19).
QUICK = {
    "data": {"train_subset": 40000, "test_subset": 1000},
    "model": {"head_pretrain_epochs": 1},
    "training": {"epochs": 5, "batch_size": 256},  # enough steps per round for every watermark to embed
}
# The undefended reference job (issue 2's accuracy and speed targets): small CNN, plain chain.
PLAIN = {
    "job": {"name": "plain"},
    "model": {"arch": "small-cnn", "n_trainers": 3},
    "training": {"epochs": 3, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}


def demo_config(quick: bool = False) -> JobConfig:
    cfg = parse_config(DEMO)
    return cfg.replace(**QUICK) if quick else cfg


def _fail(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def _new_run_dir(cfg: JobConfig, suffix: str = "") -> Path:
    try:
        return new_run_dir(cfg, suffix)
    except OSError as e:
        _fail(f"cannot create a run folder under {cfg.job.run_root}: {e.strerror or e}")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not sys.stdout.isatty(),
    )


def _print_summary(s: RunSummary, title: str) -> None:
    t = Table(title=title, show_header=False)
    t.add_row("mode", s.mode)
    t.add_row("dataset", s.dataset)
    t.add_row("test accuracy", f"{s.test_accuracy:.4f}")
    t.add_row("epochs", str(s.epochs))
    t.add_row("wall time", f"{s.wall_time_s:.1f} s")
    if s.epoch_times_s:
        t.add_row("epoch times", ", ".join(f"{x:.1f}" for x in s.epoch_times_s) + " s")
    if s.mode != "centralized":
        t.add_row("trainers", str(s.n_trainers))
        t.add_row("defences", ", ".join(s.defences) or "none (plain split learning)")
        eps = (
            "not applicable (no DP)"
            if s.epsilon is None
            else f"{s.epsilon:.3f} (delta = {s.delta:g}; guarantee: {s.guarantee})"
        )
        t.add_row("epsilon spent", eps)
        leps = "not applicable (no label DP)" if s.label_epsilon is None else f"{s.label_epsilon:g}"
        t.add_row("label epsilon spent", leps + ("" if s.label_epsilon is None else " (pure, delta = 0)"))
        for hop, b in s.bytes_per_step.items():
            t.add_row(f"bytes/step {hop}", f"{b:,.0f}")
        for c in s.compute:
            t.add_row(
                f"compute {c['party']}",
                f"{c['share']:.1%} of training multiply-adds ({c['params']:,} parameters)",
            )
    if s.run_dir:
        t.add_row("run folder", s.run_dir)
    console.print(t)


def _epoch_printer(label: str):
    def show(row: dict) -> None:
        eps = f"  epsilon {row['epsilon']:.3f}" if row.get("epsilon") is not None else ""
        if row.get("label_epsilon") is not None:
            eps += f"  label epsilon {row['label_epsilon']:g}"
        console.print(
            f"[{label}] epoch {row['epoch']}: loss {row['train_loss']:.4f}  "
            f"test acc {row['test_accuracy']:.4f}  ({row['epoch_time_s']:.1f} s){eps}"
        )

    return show


def run_chain(cfg: JobConfig, run_dir: Path, *, resume: bool = False) -> RunSummary:
    """Train the configured chain with progress output; the run folder gets config, metrics, summary.

    A run that fails to start leaves no run folder behind (a resumed one keeps its folder); a run
    whose chain the verifier rejects exits with EXIT_REJECTED after printing its summary."""
    apply_threads(cfg.job.threads)
    if cfg.job.keep_freed_memory:
        keep_freed_memory()
    try:
        data = prepare_data(cfg)
        job = ChainJob(cfg, data, run_dir)
    except Exception as e:  # noqa: BLE001 - data, config and resume errors carry their own message
        if not resume:
            shutil.rmtree(run_dir, ignore_errors=True)
        _fail(str(e) if isinstance(e, (ConfigError, ValueError, OSError)) else f"{type(e).__name__}: {e}")
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    for c in job.config_changes:
        console.print(f"resume: {c['field']} changed from {c['from']!r} to {c['to']!r} (allowed; recorded)")
    try:
        with _progress() as prog:
            task = prog.add_task("training", total=None)
            summary = job.run(
                resume=resume,
                on_epoch=_epoch_printer("chain"),
                on_step=lambda i, n: prog.update(task, completed=i, total=n),
                on_note=lambda text: console.print(f"[yellow]resume:[/] {text}"),
            )
    except (ConfigError, CheckpointError, ProtocolError, BudgetExceeded, ReleaseStoreError) as e:
        _fail(f"{e} (run folder kept: {run_dir})")
    summary.extra["verified"] = _print_verdict(run_dir) if cfg.watermark.enabled else None
    return summary


def _result_line(s: RunSummary) -> str:
    """The run's outcome on one line, printed last: the summary table above it is long, and the
    accuracy and the verifier's verdict must not scroll out of a terminal or a log's tail."""
    parts = [f"test accuracy {s.test_accuracy:.4f}"]
    if s.epsilon is not None:
        parts.append(f"epsilon {s.epsilon:.3f} ({s.guarantee})")
    if s.label_epsilon is not None:
        parts.append(f"label epsilon {s.label_epsilon:g}")
    verified = s.extra.get("verified")
    if verified is not None:
        parts.append("chain VERIFIED" if verified else "chain REJECTED")
    return "result: " + ", ".join(parts)


def _finish(summary: RunSummary, title: str) -> None:
    _print_summary(summary, title)
    console.print(_result_line(summary), highlight=False, soft_wrap=True)
    if summary.extra.get("verified") is False:
        console.print("[bold red]the verifier REJECTED this job[/]")
        raise typer.Exit(EXIT_REJECTED)


def _print_verdict(run_dir: Path, public_key: bytes | None = None) -> bool:
    """Run the verifier over a finished job and print its verdict; True if verified."""
    from clicooper.parties import verify_run

    t0 = time.perf_counter()
    verdict, cert = verify_run(run_dir, public_key=public_key)
    took = time.perf_counter() - t0
    for f in verdict.failures:
        console.print(f"[red]{f}[/]")
    t = Table(title=f"verifier: {verdict.summary().splitlines()[0]}")
    for col in ("position", "bit errors", "threshold", "p-value", "watermark"):
        t.add_column(col)
    for pos, wv in sorted(verdict.final_watermarks.items()):
        mark = "[green]match[/]" if wv.matched else "[red]no match[/]"
        t.add_row(str(pos), f"{wv.bit_errors}/{wv.n_bits}", str(wv.threshold), f"{wv.p_value:.2e}", mark)
    console.print(t)
    fp = next(iter(verdict.final_watermarks.values())).fp_bound if verdict.final_watermarks else None
    console.print(f"false-positive bound per check: {fp}; verification took {took:.2f} s")
    if cert is not None:
        console.print(f"certificate: {run_dir / 'verifier' / 'certificate.json'}")
    console.print(verdict.summary().splitlines()[0])
    return verdict.ok


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Seconds-long version on a data subset.")] = False,
    out: Annotated[Path, typer.Option(help="Folder in which the run folder is created.")] = Path("runs"),
) -> None:
    """The default job: Fashion-MNIST, small CNN, a data owner and 3 trainers."""
    try:
        cfg = demo_config(quick).replace(job={"run_root": str(out)})
    except ConfigError as e:
        _fail(str(e))
    run_dir = _new_run_dir(cfg)
    _finish(run_chain(cfg, run_dir), "CliCooper demo")


IdentityOpt = Annotated[
    Path | None, typer.Option("--identity", help="This party's own identity folder (made by `keys --job`).")
]
RunDirOpt = Annotated[
    Path | None, typer.Option("--run-dir", help="Folder for this party's state (its sub-folder <party>/).")
]
ListenOpt = Annotated[
    str | None, typer.Option("--listen", help="host:port to listen on (port 0: any free port).")
]
PeersOpt = Annotated[
    str | None,
    typer.Option(
        "--peers", help="Address book: a JSON file {party: host:port}, or - for one JSON line on stdin."
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Plaintext gRPC: peers NOT authenticated (a warning is logged).")
]


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Argument(help="TOML job configuration, or with --identity a manifest.")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this folder.")] = None,
    identity: IdentityOpt = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Data owner: the data path (with --identity).")
    ] = None,
    run_dir: RunDirOpt = None,
    listen: ListenOpt = None,
    peers: PeersOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Run a job from a TOML configuration, or resume one from its run folder.

    With both CONFIG and --resume, the run resumes under CONFIG: it may change only what cannot
    affect the model, the data, the privacy mechanism or the protocol (the number of epochs, say);
    any other change is refused, naming the field. Without CONFIG, the run's config.json is used.

    With --identity, CONFIG is a job manifest and this process is the data owner alone: the trainers
    and the verifier are separate programs (`clicooper serve`), reached over gRPC with mutual TLS."""
    if identity is not None:
        _run_data_owner(
            config, identity, data, resume or run_dir, resume is not None, listen, peers, insecure
        )
        return
    try:
        if resume is not None:
            cfg_file = resume / "config.json"
            if not resume.is_dir() or not cfg_file.is_file():
                _fail(f"{resume} is not a run folder (no config.json)")
            try:
                started = parse_config(json.loads(cfg_file.read_bytes()), str(cfg_file))
            except (ValueError, OSError, RecursionError) as e:
                raise ConfigError(f"{cfg_file} is unreadable: {e}") from None
            cfg = load_config(config) if config is not None else started
            run_dir = resume
        elif config is not None:
            cfg = load_config(config)
            run_dir = _new_run_dir(cfg)
            shutil.copy(config, run_dir / "config.toml")
        else:
            _fail("give a CONFIG.toml or --resume RUN_DIR")
    except ConfigError as e:
        _fail(str(e))
    _finish(run_chain(cfg, run_dir, resume=resume is not None), f"CliCooper run: {cfg.job.name}")


def _run_data_owner(
    manifest: Path | None,
    identity: Path,
    data: Path | None,
    run_dir: Path | None,
    resume: bool,
    listen: str | None,
    peers: str | None,
    insecure: bool,
) -> None:
    from clicooper.programs import ProgramError, run_data_owner
    from clicooper.transport.base import TransportError

    if manifest is None:
        _fail("give the job manifest (manifest.json) with --identity")
    run_dir = run_dir or _default_run_dir(manifest)
    try:
        summary = run_data_owner(
            manifest,
            identity,
            run_dir,
            data_path=data,
            listen=listen,
            peers=peers,
            resume=resume,
            insecure=insecure,
            on_epoch=_epoch_printer("chain"),
        )
    except (ProgramError, ConfigError) as e:
        _fail(str(e))
    except (TransportError, ProtocolError, CheckpointError, BudgetExceeded, ReleaseStoreError) as e:
        _fail(f"the job stopped: {e} (state kept in {run_dir})")
    except KeyboardInterrupt:  # SIGTERM or SIGINT: the job is unfinished (resume it with --resume)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_summary(summary, f"CliCooper run (data owner): {manifest}")


@app.command()
def baseline(
    config: Annotated[Path, typer.Argument(help="TOML job configuration.")],
    centralized: Annotated[
        bool, typer.Option("--centralized", help="Train the same model in one place.")
    ] = False,
    plain: Annotated[bool, typer.Option("--plain", help="The chain with every defence off.")] = False,
    no_dp: Annotated[
        bool, typer.Option("--no-dp", help="The same job with activation DP off, all else as configured.")
    ] = False,
) -> None:
    """Reference runs from the same configuration: centralized training, the undefended chain, or the
    same job without DP (what the DP costs in accuracy)."""
    if centralized + plain + no_dp != 1:
        _fail("choose exactly one of --centralized, --plain or --no-dp")
    try:
        cfg = load_config(config)
    except ConfigError as e:
        _fail(str(e))
    if no_dp:
        from clicooper.evaluation.utility import privacy_variant

        cfg = privacy_variant(cfg, float("inf"))
        run_dir = _new_run_dir(cfg, "-nodp")
        _finish(run_chain(cfg, run_dir), "the same job with DP off")
        return
    if plain:
        cfg = cfg.replace(
            privacy=NO_DEFENCES,
            watermark={"enabled": False},
        )
        run_dir = _new_run_dir(cfg, "-plain")
        _finish(run_chain(cfg, run_dir), "plain split learning (no defence)")
        return
    try:
        data = prepare_data(cfg)
    except Exception as e:  # noqa: BLE001
        _fail(str(e))
    run_dir = _new_run_dir(cfg, "-centralized")
    summary, _ = train_centralized(cfg, data, run_dir, on_epoch=_epoch_printer("centralized"))
    _print_summary(summary, "centralized training (reference)")


@app.command()
def datasets() -> None:
    """List the built-in datasets and on-disk formats."""
    from clicooper.data import available_datasets

    t = Table("name", "kind", "description", "how to get it")
    for d in available_datasets():
        t.add_row(d.name, d.kind, d.description, d.how_to_get)
    console.print(t)


@app.command()
def keys(
    name: Annotated[str | None, typer.Argument(help="Party name (e.g. trainer_1, verifier).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the key files.")] = Path("keys"),
    job: Annotated[
        Path | None,
        typer.Option(
            "--job", help="A TOML job config: make every party's keys, a local CA and the manifest."
        ),
    ] = None,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Extra host name or IP for the TLS certificates.")
    ] = None,
) -> None:
    """Create an Ed25519 identity (PEM, mode 0600) and a watermark key for a party; or, with --job,
    a whole job: OUT/manifest.json (public), OUT/<party>/ (each party's own private keys and TLS
    certificate) and OUT/ca/ (the local CA; keep ca.key offline)."""
    import re

    from clicooper.checkpoint import atomic_write_bytes
    from clicooper.provenance import Identity, new_watermark_key

    if job is not None:
        _job_keys(job, out, tuple(host or ()))
        return
    if name is None:
        _fail("give a party NAME, or --job CONFIG.toml for every party of a job")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name) or ".." in name:
        _fail(f"party name {name!r} must be 1-64 letters, digits, '_', '-' or '.', and no path")
    files = [out / f"{name}{ext}" for ext in (".pem", ".wmkey", ".pub.json")]
    existing = [str(f) for f in files if f.exists() or f.is_symlink()]
    if existing:
        _fail(f"{', '.join(existing)} exist(s); refusing to overwrite a key")
    try:
        ident = Identity.generate(name)
        ident.save(files[0])
        atomic_write_bytes(files[1], new_watermark_key().hex().encode(), mode=0o600)
        atomic_write_bytes(files[2], ident.public().model_dump_json().encode())
    except OSError as e:
        _fail(f"cannot write keys to {out}: {e.strerror or e}")
    console.print(
        f"{name}: fingerprint {ident.fingerprint()}\n  private key {files[0]}\n  watermark key "
        f"{files[1]}\n  public identity {files[2]}"
    )


def _job_keys(config: Path, out: Path, hosts: tuple[str, ...]) -> None:
    from clicooper.manifest import ManifestError, make_job

    try:
        cfg = load_config(config)
        data = prepare_data(cfg)  # the input shape and classes the public architecture is sized from
        manifest = make_job(
            cfg,
            out,
            input_shape=data.input_shape,
            num_classes=data.num_classes,
            hosts=("localhost", "127.0.0.1", *hosts),
        )
    except (ConfigError, ManifestError) as e:
        _fail(str(e))
    except (ValueError, OSError) as e:
        _fail(f"cannot make the job's keys in {out}: {e}")
    console.print(f"job {manifest.job_id}: manifest {out / 'manifest.json'} (public)")
    for p in manifest.parties:
        console.print(
            f"  {p.name} ({p.role}, position {p.position}): {out / p.name}/ (give it to {p.name} only)"
        )
    console.print(f"  local CA: {out / 'ca'}/ (keep ca.key offline)")


def _public_key_file(path: Path) -> bytes:
    """A verifier public key from a file: `keys`' NAME.pub.json, a PEM private key, or raw hex."""
    from clicooper.provenance import Identity, PublicIdentity

    try:
        text = path.read_bytes()[:1_000_000]
        if text.lstrip().startswith(b"{"):
            return PublicIdentity.model_validate_json(text).public_key
        if b"PRIVATE KEY" in text:
            return Identity.load(path).public_key_bytes()
        key = bytes.fromhex(text.decode().strip())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        _fail(f"{path} does not hold a verifier public key: {e}")
    if len(key) != 32:
        _fail(f"{path} does not hold a 32-byte Ed25519 public key")
    return key


KeyOpt = Annotated[
    Path | None,
    typer.Option("--verifier-key", help="The verifier's public key (NAME.pub.json, PEM or hex) to pin."),
]


def _default_run_dir(manifest: Path) -> Path:
    """`<run_root>/<job id>` from the manifest: where a party keeps its state by default."""
    from clicooper.manifest import JobManifest, ManifestError

    try:
        m = JobManifest.load(manifest)
    except ManifestError as e:
        _fail(str(e))
    return m.config.job.run_root / m.job_id


@serve_app.command("trainer")
def serve_trainer(
    manifest: Annotated[Path, typer.Argument(help="The job manifest (manifest.json).")],
    identity: Annotated[Path, typer.Option("--identity", help="This trainer's own identity folder.")],
    run_dir: RunDirOpt = None,
    listen: ListenOpt = None,
    peers: PeersOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Serve one trainer until SIGTERM; resumes from its newest checkpoint in RUN_DIR/<name>/."""
    _serve("trainer", manifest, identity, run_dir, listen, peers, insecure)


@serve_app.command("verifier")
def serve_verifier(
    manifest: Annotated[Path, typer.Argument(help="The job manifest (manifest.json).")],
    identity: Annotated[Path, typer.Option("--identity", help="The verifier's own identity folder.")],
    run_dir: RunDirOpt = None,
    listen: ListenOpt = None,
    peers: PeersOpt = None,
    insecure: InsecureOpt = False,
) -> None:
    """Serve the verifier until SIGTERM; then, if every round was recorded, check the job and issue
    the certificate in RUN_DIR/verifier/."""
    _serve("verifier", manifest, identity, run_dir, listen, peers, insecure)


def _serve(
    role: str, manifest: Path, identity: Path, run_dir: Path | None, listen, peers, insecure: bool
) -> None:
    from clicooper.programs import ProgramError, serve
    from clicooper.transport.base import TransportError

    try:
        code = serve(
            role,
            manifest,
            identity,
            run_dir or _default_run_dir(manifest),
            listen=listen,
            peers=peers,
            insecure=insecure,
        )
    except (ProgramError, ConfigError, CheckpointError, TransportError) as e:
        _fail(str(e))
    raise typer.Exit(code)


@launch_app.command("local")
def launch_local_cmd(
    manifest: Annotated[Path, typer.Argument(help="The job manifest (manifest.json).")],
    keys_dir: Annotated[
        Path | None,
        typer.Option("--keys", help="Folder of the parties' identity folders (default: the manifest's)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder in which the run folder is created.")] = Path("runs"),
    quick: Annotated[
        bool, typer.Option("--quick", help="At most 2 epochs on at most 20,000 samples (tests, a first try).")
    ] = False,
    data: Annotated[Path | None, typer.Option("--data", help="The data owner's data path.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop the job after this many seconds.")] = None,
) -> None:
    """Start the verifier and every trainer as separate processes on 127.0.0.1, then the data owner;
    per-party logs in RUN/logs/. Exit 0 when the job ran and the verifier certified it."""
    from clicooper.launch import LaunchError, launch_local
    from clicooper.manifest import ManifestError

    try:
        r = launch_local(
            manifest, keys_dir=keys_dir, run_root=out, quick=quick, data_path=data, job_timeout=timeout
        )
    except (LaunchError, ManifestError) as e:
        _fail(str(e))
    s = r.summary or {}
    console.print(f"run folder: {r.run_dir} (logs in {r.run_dir / 'logs'})")
    if s:
        console.print(f"test accuracy {s.get('test_accuracy'):.4f}; epsilon {s.get('epsilon')}")
    console.print(
        f"exit codes: data_owner {r.data_owner_code}, "
        + ", ".join(f"{k} {v}" for k, v in r.server_codes.items())
    )
    if r.has_verifier:
        ok = bool(r.verdict and r.verdict.get("ok"))
        console.print("verifier: " + ("[green]VERIFIED[/]" if ok else "[red]REJECTED or no verdict[/]"))
        if not ok:
            raise typer.Exit(EXIT_REJECTED)
    if not r.ok:
        raise typer.Exit(1)


@verify_app.command("job")
def verify_job(
    run_dir: Annotated[Path, typer.Argument(help="A finished job's run folder.")],
    verifier_key: KeyOpt = None,
) -> None:
    """Verify every stage of a job (signed log, signatures, links, nonces, weights, transcripts,
    watermarks). Exit 0 VERIFIED, 3 REJECTED, 2 error."""
    from clicooper.parties.verifier import LOG_FILE

    key = _public_key_file(verifier_key) if verifier_key is not None else None
    if not (run_dir / "verifier").is_dir():
        _fail(f"{run_dir} has no verifier folder: not a run folder, or watermarking was off")
    if not (run_dir / "verifier" / LOG_FILE).exists():  # nothing is written into, say, a keys folder
        _fail(f"{run_dir} has no verifier/{LOG_FILE}: not a run folder (a keys folder?), or no job ran")
    try:
        ok = _print_verdict(run_dir, key)
    except (FileNotFoundError, OSError, ValueError) as e:
        _fail(str(e))
    raise typer.Exit(0 if ok else EXIT_REJECTED)


@verify_app.command("certificate")
def verify_certificate_cmd(
    cert_file: Annotated[Path, typer.Argument(help="A certificate.json written by `verify job`.")],
    verifier_key: KeyOpt = None,
    run: Annotated[
        Path | None, typer.Option(help="Take the verifier's public key from this run folder.")
    ] = None,
) -> None:
    """Check a certificate offline against the verifier's public key. Exit 0 valid, 5 invalid, 2 error."""
    from clicooper.provenance import Identity, load_certificate, verify_certificate

    if (verifier_key is None) == (run is None):
        _fail("give exactly one of --verifier-key FILE or --run RUN_DIR")
    key = _public_key_file(verifier_key) if verifier_key is not None else None
    if run is not None:
        try:
            key = Identity.load(run / "verifier" / "identity.pem").public_key_bytes()
        except (OSError, ValueError) as e:
            _fail(f"no verifier key in {run}: {e}")
    try:
        if cert_file.stat().st_size > 64 * 1024 * 1024:
            _fail(f"{cert_file} is too large to be a certificate")
        cert = load_certificate(cert_file)
    except (OSError, ValueError, RecursionError) as e:
        _fail(f"{cert_file} is not a certificate: {str(e).splitlines()[0]}")
    if not verify_certificate(cert, key):
        console.print(f"[bold red]INVALID[/]: {cert_file} is not signed by verifier {cert.verifier[:16]}...")
        raise typer.Exit(EXIT_BAD_CERTIFICATE)
    console.print(
        f"[green]VALID[/]: job {cert.job_id}, issued {cert.issued_at} by verifier {cert.verifier[:16]}...; "
        f"{cert.chain.n_positions} positions x {cert.chain.n_rounds} rounds, {cert.chain.n_records} records"
    )
    for r in cert.receipts:
        console.print(
            f"  {r.name} (position {r.position}): {r.rounds} rounds, {r.steps} steps, {r.samples} samples"
        )


@verify_app.command("ownership")
def verify_ownership(
    model_file: Annotated[Path, typer.Argument(help="Suspect segment (safetensors).")],
    run: Annotated[Path, typer.Option(help="Run folder whose registered trainers are checked.")],
) -> None:
    """Extract the marks of every registered trainer from a suspect segment; report matches and
    p-values. Exit 0 a match, 4 no match, 2 error."""
    from safetensors.torch import load as load_safetensors

    from clicooper.parties.verifier import EvidenceError, load_evidence
    from clicooper.provenance import final_claims, ownership_query

    try:
        ev = load_evidence(run / "verifier")
    except EvidenceError as e:
        _fail(f"the evidence in {run} does not verify: {e}")
    try:
        if model_file.stat().st_size > 2 * 1024**3:
            _fail(f"{model_file} is larger than 2 GiB")
        tensors = load_safetensors(model_file.read_bytes())
    except OSError as e:
        _fail(f"cannot read {model_file}: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        _fail(f"{model_file} is not a safetensors file: {e}")
    if any(k.startswith("model.") for k in tensors):
        tensors = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        claims = final_claims(ev.records, ev.registry, ev.nonces, ev.spec)
        matches = ownership_query(tensors, ev.registry, claims, ev.spec)
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        _fail(f"cannot check {model_file} against {run}: {e}")
    t = Table("trainer", "position", "bit errors", "p-value", "verdict", title=f"ownership of {model_file}")
    for m in matches:
        v = m.verdict
        verdict = "[green]MATCH[/]" if m.matched else (m.error or "no match")
        errors = f"{v.bit_errors}/{v.n_bits}" if v else "-"
        t.add_row(m.name, str(m.position), errors, f"{v.p_value:.2e}" if v else "-", verdict)
    console.print(t)
    raise typer.Exit(0 if any(m.matched for m in matches) else EXIT_NO_MATCH)


QuickOpt = Annotated[bool, typer.Option("--quick", help="Small subset and grid (for tests).")]
DatasetOpt = Annotated[str | None, typer.Option(help="Any registered dataset (default: fashion-mnist).")]
PathOpt = Annotated[Path | None, typer.Option(help="Data path for on-disk formats.")]


def _eval_data(cfg: JobConfig) -> DatasetSplits:
    try:
        return prepare_data(cfg)
    except Exception as e:  # noqa: BLE001 - data errors carry their own how-to message
        _fail(str(e))


def _eval_config(quick: bool, dataset: str | None, path: Path | None, base: dict | None = None) -> JobConfig:
    """The demo job (or `base`) without watermarking, on another dataset if asked, shrunk by --quick."""
    cfg = (parse_config(base) if base is not None else demo_config()).replace(watermark={"enabled": False})
    try:
        if dataset is not None:
            cfg = cfg.replace(data={"dataset": dataset, "path": str(path) if path else None})
        if quick:
            cfg = cfg.replace(data={"train_subset": 2000, "test_subset": 500}, training={"epochs": 2})
    except ConfigError as e:
        _fail(str(e))
    return cfg


@eval_app.command("watermark")
def eval_watermark(
    quick: QuickOpt = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/watermark"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
) -> None:
    """Watermark robustness (fine-tuning, pruning, quantisation, overwriting, forged/replayed evidence)."""
    from clicooper.evaluation.watermark import run_watermark_eval

    cfg = _eval_config(quick, dataset, path, base=PLAIN)  # the mark alone, on the undefended job
    data = _eval_data(cfg)
    md = run_watermark_eval(cfg, data, out, quick=quick)
    console.print(f"report: {md} (and {md.with_suffix('.html')})")


@eval_app.command("utility")
def eval_utility(
    quick: QuickOpt = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/utility"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
    train_subset: Annotated[
        int | None,
        typer.Option("--train-subset", help="Train on a seeded stratified subset (test set whole)."),
    ] = None,
    guarantee: Annotated[
        list[str] | None,
        typer.Option("--guarantee", help="'activation' and/or 'end-to-end' (repeat; default: both)."),
    ] = None,
    epsilon: Annotated[
        list[float] | None,
        typer.Option("--epsilon", help="Epsilons to measure (repeat; 'inf' = no DP; default: 0.5..8, inf)."),
    ] = None,
    pretrain_epochs: Annotated[
        list[int] | None,
        typer.Option(
            "--pretrain-epochs", help="Compute-share rows: head pre-training epochs (repeat; default: 0, 1)."
        ),
    ] = None,
) -> None:
    """Accuracy vs epsilon (0.5..8, none) for both guarantees, with the data owner's compute share."""
    from clicooper.evaluation.utility import EPSILONS, GUARANTEES, run_utility_sweep

    unknown = set(guarantee or ()) - set(GUARANTEES)
    if unknown:
        _fail(f"unknown guarantee(s) {sorted(unknown)}; choose from {list(GUARANTEES)}")
    cfg = _eval_config(quick, dataset, path)
    data = _eval_data(cfg)
    if train_subset is not None:
        data = data.subset(train_subset, None, seed=cfg.job.seed)
    if quick:
        md = run_utility_sweep(cfg, data, out, epsilons=(2.0, float("inf")), guarantees=("activation",))
    else:
        md = run_utility_sweep(
            cfg,
            data,
            out,
            epsilons=tuple(epsilon) if epsilon else EPSILONS,
            guarantees=tuple(guarantee) if guarantee else GUARANTEES,
            pretrain_epochs=(0, 1) if pretrain_epochs is None else tuple(pretrain_epochs),
        )
    console.print(f"report: {md} (CSV: {out / 'utility.csv'}, plot: {out / 'utility.png'})")


@eval_app.command("release-learners")
def eval_release_learners(
    quick: QuickOpt = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/release_learners"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
    epochs: Annotated[int, typer.Option(help="Epochs each learner trains on the release.")] = 10,
) -> None:
    """Which trainer-side learner generalises from a noised one-shot release to clean activations."""
    from clicooper.evaluation.release_learners import run_release_learners

    cfg = _eval_config(quick, dataset, path)
    md = run_release_learners(cfg, _eval_data(cfg), out, epochs=2 if quick else epochs)
    console.print(f"report: {md} (CSV: {out / 'release_learners.csv'})")


@eval_app.command("privacy")
def eval_privacy(
    quick: Annotated[
        bool, typer.Option("--quick", help="Small subset, few attack steps (for tests).")
    ] = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/privacy"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
    epsilon: Annotated[float, typer.Option(help="Epsilon of the DP configurations.")] = 2.0,
    gamma: Annotated[int, typer.Option(help="Label expansion factor.")] = 2,
    eps_sweep: Annotated[
        list[float] | None, typer.Option("--eps-sweep", help="Also train full CliCooper at these epsilons.")
    ] = None,
    label_epsilon: Annotated[
        float | None, typer.Option("--label-epsilon", help="Label DP of the '+ label DP' rows.")
    ] = DEFAULT_LABEL_EPSILON,
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Train and attack only these rows, by name (repeat); default: all."),
    ] = None,
) -> None:
    """Attacks x defences: clustering, inversion and extraction against the undefended default job, no
    defence on the defended job's model, DP only, label expansion only, full CliCooper (with and without
    label DP) and U-shaped (with and without label DP); Markdown/HTML report with figures."""
    from clicooper.evaluation.privacy import UnknownRowError, run_privacy_eval

    cfg = _eval_config(quick, dataset, path)
    plain = _eval_config(quick, dataset, path, base=PLAIN)
    data = _eval_data(cfg)
    sweep = tuple(eps_sweep or ())
    try:
        md = run_privacy_eval(
            cfg,
            data,
            out,
            quick=quick,
            epsilon=epsilon,
            gamma=gamma,
            eps_sweep=sweep,
            label_epsilon=label_epsilon,
            default_job=plain,
            only=tuple(only) if only else None,
        )
    except UnknownRowError as e:  # only this usage error; a failure while training is not one
        _fail(str(e))
    console.print(f"report: {md} (and {md.with_suffix('.html')})")


@eval_app.command("e2e")
def eval_e2e(
    quick: Annotated[bool, typer.Option("--quick", help="Small subset, 1 DP-SGD epoch (for tests).")] = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/e2e"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
    epsilon: Annotated[
        list[float] | None, typer.Option(help="Total end-to-end epsilon target(s) (default 2).")
    ] = None,
    delta: Annotated[float, typer.Option(help="Delta of the total guarantee.")] = 1e-5,
    head_fraction: Annotated[
        float | None, typer.Option(help="Share of the budget (Gaussian-DP mu^2) for the head's DP-SGD.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="DP-SGD epochs of the head.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Expected Poisson batch size of DP-SGD.")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Per-sample gradient clip norm.")] = None,
    lr: Annotated[float | None, typer.Option(help="DP-SGD learning rate (SGD, momentum 0.9).")] = None,
    arch: Annotated[str | None, typer.Option(help="Zoo model whose block 0 is the head.")] = None,
    embed: Annotated[int | None, typer.Option(min=2, help="Release width of the head (default 10).")] = None,
) -> None:
    """End-to-end DP utility: DP-SGD head, one-shot noisy release, linear read-out; clean test accuracy."""
    from dataclasses import replace

    from clicooper.evaluation.e2e import HeadDpSettings, run_e2e, write_results

    cfg = _eval_config(False, dataset, path)
    data = _eval_data(cfg)
    settings = HeadDpSettings()
    if quick:
        data = data.subset(2000, 500, seed=cfg.job.seed)
        settings = replace(settings, epochs=1, batch_size=256)
    given = {"head_fraction": head_fraction, "epochs": epochs, "batch_size": batch_size}
    given |= {"grad_clip": grad_clip, "lr": lr, "arch": arch, "embed": embed}
    settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
    results = [
        run_e2e(data, epsilon=e, delta=delta, settings=settings, seed=cfg.job.seed, log=console.print)
        for e in (epsilon or [2.0])
    ]
    console.print(f"report: {write_results(results, out)} (and {out / 'e2e.jsonl'})")


@eval_app.command("label-dp")
def eval_label_dp(
    quick: QuickOpt = False,
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports/label-dp"),
    dataset: DatasetOpt = None,
    path: PathOpt = None,
    config: Annotated[Path | None, typer.Option(help="TOML job to evaluate (default: the demo job).")] = None,
    label_epsilons: Annotated[
        list[float] | None,
        typer.Option("--label-epsilon", help="Label epsilons to measure (repeat); 'none' is always added."),
    ] = None,
    train_subset: Annotated[
        int | None, typer.Option("--train-subset", help="Train on a seeded subset (test set whole).")
    ] = None,
    u_shaped: Annotated[bool, typer.Option(help="Also measure U-shaped mode.")] = True,
    label_prior: Annotated[
        str | None, typer.Option(help="'uniform' or 'learned' (two stages); default: the job's.")
    ] = None,
) -> None:
    """Label DP: accuracy and clustering success on gradients and pseudo-labels (1 and 5 known labels per
    class) for label epsilon in {1, 2, 4, 8, none}, with the bound the epsilons imply; CSV and report."""
    from clicooper.evaluation.label_dp import LABEL_EPSILONS, run_label_dp_eval

    try:
        base = load_config(config).model_dump(mode="json") if config is not None else None
    except ConfigError as e:
        _fail(str(e))
    cfg = _eval_config(quick, dataset, path, base=base)
    if label_prior is not None:
        try:
            cfg = cfg.replace(privacy={"label_prior": label_prior})
        except ConfigError as e:
            _fail(str(e))
    data = _eval_data(cfg)
    if train_subset is not None:
        data = data.subset(train_subset, None, seed=cfg.job.seed)
    eps = (*label_epsilons, None) if label_epsilons else LABEL_EPSILONS
    md = run_label_dp_eval(cfg, data, out, quick=quick, label_epsilons=eps, u_shaped=u_shaped)
    console.print(f"report: {md} (CSV: {out / 'label_dp.csv'})")


def _attacked_job(config: Path | None, quick: bool):
    """Train the job of CONFIG (default: the demo) while recording what each trainer receives."""
    from clicooper.evaluation.privacy import train_and_observe

    try:
        cfg = load_config(config) if config is not None else demo_config()
    except ConfigError as e:
        _fail(str(e))
    cfg = cfg.replace(watermark={"enabled": False}, privacy={"secret_seed": cfg.job.seed})
    if quick:
        cfg = cfg.replace(data={"train_subset": 2000, "test_subset": 500}, training={"epochs": 2})
    data = _eval_data(cfg)
    job, observed = train_and_observe(cfg, data)
    return cfg, data, job, observed


def _print_rows(title: str, rows: list[dict]) -> None:
    t = Table(*rows[0].keys(), title=title)
    for r in rows:
        t.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()))
    console.print(t)


ConfigArg = Annotated[Path | None, typer.Argument(help="TOML job configuration (default: the demo job).")]


@attack_app.command("clustering")
def attack_clustering(config: ConfigArg = None, quick: QuickOpt = False) -> None:
    """Liu & Lyu clustering label inference at every position (activations, gradients, pseudo-labels)."""
    from clicooper.evaluation.privacy import KNOWN_PER_CLASS, Epsilons, clustering_rows

    cfg, data, job, obs = _attacked_job(config, quick)
    rows = clustering_rows(
        obs,
        data,
        cfg.privacy.gamma,
        cfg.job.seed,
        quick,  # as in `eval privacy`
        known_per_class=KNOWN_PER_CLASS,
        epsilons=Epsilons.of(job),
    )
    _print_rows("clustering label inference (success bound: what the epsilons imply)", rows)


@attack_app.command("inversion")
def attack_inversion(config: ConfigArg = None, quick: QuickOpt = False) -> None:
    """White-box rMLE and black-box decoder reconstruction of private inputs at trainer 1."""
    from clicooper.evaluation.privacy import attacker_split, inversion_rows

    cfg, data, job, obs = _attacked_job(config, quick)
    aux, _ = attacker_split(data, cfg.job.seed)  # the same split as `eval privacy`
    row, *_ = inversion_rows(job, obs, data, aux[0], 8 if quick else 64, quick, cfg.job.seed, aux_y=aux[1])
    _print_rows(  # one line per metric: the trivial guesses beside the attacks
        "inversion at trainer 1 (SSIM/PSNR against the private images)",
        [{"metric": k, "value": v} for k, v in row.items()],
    )


@attack_app.command("extraction")
def attack_extraction(config: ConfigArg = None, quick: QuickOpt = False) -> None:
    """Model completion by trainer 1 alone and by the coalition, from 0..n auxiliary labels."""
    from clicooper.evaluation.privacy import attacker_split, extraction_rows

    cfg, data, job, _ = _attacked_job(config, quick)
    aux, test = attacker_split(data, cfg.job.seed)  # the same split as `eval privacy`
    sizes = [n for n in ([0, 50] if quick else [0, 100, 1000]) if n <= len(aux[0])]
    _print_rows(
        "model extraction (surrogate accuracy)",
        extraction_rows(job, cfg, data, aux, test, sizes, quick, cfg.job.seed),
    )


def main() -> None:  # pragma: no cover
    app()
