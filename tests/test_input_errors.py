"""Issue 10, findings 4, 5 and 6 (codec): every bad input ends in a clean error of the project's own
type (`error: ...` and exit 2 on the command line), never a traceback; data sources cannot size the
model to gigabytes; and property tests: any bytes decode to a message or a CodecError, any config
parses or raises ConfigError."""

from __future__ import annotations

import contextlib
import gzip
import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clicooper.cli import EXIT_REJECTED, EXIT_USAGE, app
from clicooper.config import ConfigError, JobConfig, load_config, parse_config
from clicooper.data import load_dataset
from clicooper.data.loaders import DataLimits
from clicooper.provenance import ChainVerdict, Finding
from clicooper.transport import Forward, Header
from clicooper.transport.codec import CodecError, decode, encode
from clicooper.transport.messages import Nonce

runner = CliRunner()
TINY = {
    "job": {"name": "tiny"},
    "data": {"dataset": "digits", "train_subset": 300, "test_subset": 100},
    "model": {"arch": "small-cnn", "n_trainers": 2},
    "training": {"epochs": 1, "batch_size": 32},
}


def _toml(cfg: dict) -> str:
    lines = []
    for section, fields in cfg.items():
        lines.append(f"[{section}]")
        for k, v in fields.items():
            lines.append(f"{k} = {json.dumps(v) if not isinstance(v, float) else repr(v)}")
    return "\n".join(lines) + "\n"


def _with(**sections) -> dict:
    out = {k: dict(v) for k, v in TINY.items()}
    for k, v in sections.items():
        out[k] = {**out.get(k, {}), **v}
    return out


def _run_cli(tmp_path, text: str | bytes):
    path = tmp_path / "job.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    root = tmp_path / "runs"
    if isinstance(text, str) and "[job]" in text and "run_root" not in text:
        path.write_text(text.replace("[job]\n", f'[job]\nrun_root = "{root}"\n', 1))
    r = runner.invoke(app, ["run", str(path)])
    return r, root


# ---------------------------------------------------------------- finding 4: config and CLI errors

BAD_CONFIGS = {
    "unknown model": _with(model={"arch": "no-such-net"}),
    "cut points out of range": _with(model={"cut_points": [1, 9]}),
    "cut points decreasing": _with(model={"cut_points": [3, 1]}),
    "cut points empty": _with(model={"cut_points": []}),
    "cut points wrong count": _with(model={"cut_points": [1, 2, 3]}),
    "head beyond model": _with(model={"head_blocks": 5}),
    "cnn on tabular": _with(data={"dataset": "breast-cancer"}),
    "unreachable fp bound": _with(watermark={"enabled": True, "n_bits": 16, "fp_bound": 1e-9}),
    "budget below epsilon": _with(privacy={"dp": True, "epsilon": 2.0, "budget_epsilon": 1.0}),
    "lr inf": _with(training={"lr": float("inf")}),
    "strength inf": _with(watermark={"enabled": True, "strength": float("inf")}),
    "epsilon inf": _with(privacy={"dp": True, "epsilon": float("inf")}),
    "noise multiplier 0": _with(privacy={"dp": True, "noise_multiplier": 0.0}),
    "dp yes": _with(privacy={"dp": "yes", "epsilon": 2.0}),
    "run root in /etc": _with(job={"run_root": "/etc/clicooper-runs"}),
    "run root of unknown user": _with(job={"run_root": "~no-such-user-here/runs"}),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_finding4_bad_config_is_a_clean_error_and_leaves_no_run_folder(tmp_path, name):
    r, root = _run_cli(tmp_path, _toml(BAD_CONFIGS[name]))
    assert r.exit_code == EXIT_USAGE, (name, r.output, r.exception)
    assert r.output.startswith("error:") and "Traceback" not in r.output
    assert not root.exists() or not any(root.iterdir())
    with pytest.raises(ConfigError):
        parse_config(BAD_CONFIGS[name])


@pytest.mark.parametrize(
    "content", [b"", b"\x00\x01\x02\xff\xfe binary", b"x = [[[[", b"[]", b"a = " + b"[" * 5000]
)
def test_finding4_unusable_config_files(tmp_path, content):
    r, _ = _run_cli(tmp_path, content)
    assert r.exit_code == EXIT_USAGE and r.output.startswith("error:"), r.output


def test_finding4_directory_and_dev_null(tmp_path):
    for target in (str(tmp_path), "/dev/null"):
        r = runner.invoke(app, ["run", target])
        assert r.exit_code == EXIT_USAGE and r.output.startswith("error:"), r.output
    assert "empty" in runner.invoke(app, ["run", "/dev/null"]).output


def test_finding4_run_that_fails_to_start_leaves_no_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = _with(data={"dataset": "idx", "path": str(tmp_path / "empty"), "train_subset": None})
    cfg["data"] = {k: v for k, v in cfg["data"].items() if v is not None}
    r, root = _run_cli(tmp_path, _toml(cfg))
    assert r.exit_code == EXIT_USAGE and "IDX" in r.output, r.output
    assert not any(root.iterdir())


def test_finding4_rejected_verdict_exits_nonzero(tmp_path, monkeypatch):
    import clicooper.parties

    def rejected(run_dir, **_):
        f = Finding(position=1, round=0, ok=False, reason="forged")
        return ChainVerdict(job_id="j", n_positions=1, n_rounds=1, ok=False, findings=[f]), None

    monkeypatch.setattr(clicooper.parties, "verify_run", rejected)
    r, _ = _run_cli(tmp_path, _toml(_with(watermark={"enabled": True, "n_bits": 64})))
    assert r.exit_code == EXIT_REJECTED and "REJECTED" in r.output, r.output


def test_finding4_run_config_with_resume_uses_the_config(tmp_path):
    r, root = _run_cli(tmp_path, _toml(TINY))
    assert r.exit_code == 0, r.output
    (run,) = root.iterdir()
    (tmp_path / "more.toml").write_text(_toml(_with(training={"epochs": 2}, job={"run_root": str(root)})))
    r = runner.invoke(app, ["run", str(tmp_path / "more.toml"), "--resume", str(run)])
    assert r.exit_code == 0 and "training.epochs changed from 1 to 2" in r.output, r.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    lr = _with(training={"epochs": 2, "lr": 0.5}, job={"run_root": str(root)})  # epochs as last resumed
    (tmp_path / "lr.toml").write_text(_toml(lr))
    r = runner.invoke(app, ["run", str(tmp_path / "lr.toml"), "--resume", str(run)])
    assert r.exit_code == EXIT_USAGE and "training.lr" in r.output


def test_finding4_keys_path_safety(tmp_path):
    out = tmp_path / "keys"
    for bad in ("../x", "/tmp/x", "a/b", ".."):
        r = runner.invoke(app, ["keys", bad, "--out", str(out)])
        assert r.exit_code == EXIT_USAGE and r.output.startswith("error:"), (bad, r.output)
    assert not (tmp_path / "x.pem").exists()
    assert runner.invoke(app, ["keys", "t", "--out", str(out)]).exit_code == 0
    wm = (out / "t.wmkey").read_bytes()
    (out / "t.pem").unlink()  # even with the identity gone, the watermark key is never overwritten
    r = runner.invoke(app, ["keys", "t", "--out", str(out)])
    assert r.exit_code == EXIT_USAGE and "t.wmkey" in r.output
    assert (out / "t.wmkey").read_bytes() == wm


def test_finding4_dp_summary_never_claims_noise_without_noise():
    for privacy in ({"dp": True, "epsilon": float("inf")}, {"dp": True, "noise_multiplier": 0.0}):
        with pytest.raises(ConfigError):
            parse_config({"privacy": privacy})


# ---------------------------------------------------------------- finding 5: data bounds


def _idx(path, dtype_code: int, dims: tuple[int, ...], payload: bytes = b"", gz: bool = False) -> None:
    data = bytes([0, 0, dtype_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload
    path.write_bytes(gzip.compress(data) if gz else data)


def _idx_set(folder, train_n=2, test_n=2, label=1, image_dims=(4, 4)):
    folder.mkdir(exist_ok=True)
    for stem, n in (("train", train_n), ("t10k", test_n)):
        h, w = image_dims
        _idx(folder / f"{stem}-images-idx3-ubyte", 0x08, (n, h, w), bytes(n * h * w))
        _idx(folder / f"{stem}-labels-idx1-ubyte", 0x0C, (n,), struct.pack(f">{n}i", *[label] * n))


def test_finding5_huge_label_in_npz(tmp_path):
    y = np.zeros(20, dtype=np.int64)
    y[0] = 10**7
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 3), dtype=np.float32), y=y)
    with pytest.raises(ValueError, match="max_classes"):
        load_dataset("npz", tmp_path / "d.npz")


def test_finding5_idx_label_2_31(tmp_path):
    _idx_set(tmp_path / "a", label=2**31 - 1)
    with pytest.raises(ValueError, match="max_classes"):
        load_dataset("idx", tmp_path / "a")


def test_finding5_idx_header_declaring_huge_images(tmp_path):
    folder = tmp_path / "b"
    _idx_set(folder)
    _idx(folder / "train-images-idx3-ubyte", 0x08, (0, 60000, 60000))  # 16 bytes, no payload
    with pytest.raises(ValueError, match="max_input_elements"):
        load_dataset("idx", folder)


def test_finding5_empty_idx_set(tmp_path):
    _idx_set(tmp_path / "c", train_n=0, test_n=0)
    with pytest.raises(ValueError, match="empty"):
        load_dataset("idx", tmp_path / "c")


def test_finding5_limits_are_configurable(tmp_path):
    _idx_set(tmp_path / "d", label=50)
    assert load_dataset("idx", tmp_path / "d").num_classes == 51
    with pytest.raises(ValueError, match="max_classes"):
        load_dataset("idx", tmp_path / "d", limits=DataLimits(max_classes=10))
    assert JobConfig().data.max_classes == 1000


def test_finding5_gzip_bomb_is_bounded(tmp_path):
    folder = tmp_path / "e"
    _idx_set(folder)
    (folder / "train-images-idx3-ubyte").unlink()
    _idx(folder / "train-images-idx3-ubyte.gz", 0x08, (2, 4, 4), bytes(32) + bytes(10**6), gz=True)
    with pytest.raises(ValueError, match="bytes"):
        load_dataset("idx", folder, limits=DataLimits(max_file_bytes=10**5))


# ---------------------------------------------------------------- finding 6: the decoder

H = Header("job", "a", "b", 1, 2, 3)


def _frame(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    n = -(-(4 + len(text)) // 64) * 64 - 4
    return struct.pack(">I", n) + text + b" " * (n - len(text)) + body


def _fwd_header(**changes) -> dict:
    h = {
        "kind": "forward",
        "header": {"job_id": "j", "sender": "a", "receiver": "b", "round": 0, "step": 0, "seq": 0},
        "fields": {"train": True},
        "tensors": [{"name": "activation", "dtype": "float32", "shape": [1]}],
    }
    h.update(changes)
    return h


@pytest.mark.parametrize(
    "header",
    [
        _fwd_header(kind=["forward"]),
        _fwd_header(kind={"a": 1}),
        _fwd_header(fields=[1, "a", None]),
        _fwd_header(fields={"train": [1]}),
        _fwd_header(header=[1]),
        _fwd_header(tensors=[{"name": "activation", "dtype": ["float32"], "shape": [1]}]),
        _fwd_header(tensors=[{"name": "activation", "dtype": "float32", "shape": [0, 2**63]}]),
        _fwd_header(tensors=[{"name": "activation", "dtype": "float32", "shape": {"a": 1}}]),
        _fwd_header(tensors={"activation": 1}),
        _fwd_header(
            header={"job_id": "j", "sender": "a", "receiver": "b", "round": 2**64, "step": 0, "seq": 0}
        ),
        _fwd_header(header={"job_id": "j", "sender": "a", "receiver": "b", "round": -1, "step": 0, "seq": 0}),
    ],
)
def test_finding6_wrong_json_types_are_codec_errors(header):
    with pytest.raises(CodecError):
        decode(_frame(header, bytes(64)))


def test_finding6_huge_integers_and_deep_nesting():
    for text in ('{"kind": "forward", "x": ' + "9" * 5000 + "}", '{"kind": ' + "[" * 5000 + "]" * 5000 + "}"):
        with pytest.raises(CodecError):
            decode(_raw(text))
    nested = Nonce(header=H, nonce="00" * 16, links="[" * 100000)
    msg = decode(bytes(encode(nested)))  # a deeply nested *string* field is just a string
    assert msg.links == "[" * 100000


def _raw(text: str) -> bytes:
    b = text.encode()
    n = -(-(4 + len(b)) // 64) * 64 - 4
    return struct.pack(">I", n) + b + b" " * (n - len(b))


def test_finding6_round_of_2_64_is_rejected_on_both_ends():
    with pytest.raises(CodecError):
        decode(bytes(encode(Forward(header=Header("j", "a", "b", 2**64, 0, 0), activation=torch.ones(1)))))


def test_finding6_finite_float16_whose_sum_overflows_is_accepted():
    t = torch.full((64,), 60000.0, dtype=torch.float16)
    msg = decode(bytes(encode(Forward(header=H, activation=t))))
    assert torch.equal(msg.activation, t)
    t[3] = float("inf")
    with pytest.raises(CodecError, match="NaN or infinity"):
        decode(bytes(encode(Forward(header=H, activation=t))))


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=4)
)
_values = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=6,
)
VALID = bytes(encode(Forward(header=H, activation=torch.randn(2, 3))))
_TOP = ("kind", "header", "fields", "tensors")
_INNER = ("job_id", "round", "step", "seq", "train", "name", "dtype", "shape")


def _mutated_header(where: str, value) -> bytes:
    h = _fwd_header()
    if where in _TOP:
        h[where] = value
    elif where in h["header"]:
        h["header"][where] = value
    elif where == "train":
        h["fields"]["train"] = value
    else:
        h["tensors"][0][where] = value
    try:
        return _frame(h, bytes(64))
    except (TypeError, ValueError):  # not JSON-serialisable: no such message can exist
        return b""


_header_mutations = st.builds(_mutated_header, st.sampled_from(_TOP + _INNER), _values)
_bit_flips = st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=4).map(
    lambda flips: bytes(dict(flips).get(i, b) for i, b in enumerate(VALID))
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: VALID[: len(b) % 200] + b),
        _header_mutations,
        _bit_flips,
    )
)
def test_property_decoder_any_bytes_give_a_message_or_codec_error(data):
    with contextlib.suppress(CodecError):
        decode(data)


_KEYS = {s: list(f.annotation.model_fields) for s, f in JobConfig.model_fields.items()}
_known = st.sampled_from(sorted(_KEYS)).flatmap(
    lambda s: st.dictionaries(st.sampled_from(_KEYS[s]), _values, max_size=3).map(lambda d: {s: d})
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_known, st.dictionaries(st.text(max_size=8), _values, max_size=3), _values))
def test_property_config_parser_raises_only_config_error(data):
    with contextlib.suppress(ConfigError):
        parse_config(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_property_config_file_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_bytes(data)
    with contextlib.suppress(ConfigError):
        load_config(path)


def test_finding4_eval_with_unknown_dataset_is_a_clean_error():
    r = runner.invoke(app, ["eval", "utility", "--quick", "--dataset", "no-such-data"])
    assert r.exit_code == EXIT_USAGE and r.output.startswith("error:") and "no-such-data" in r.output


def test_a_data_owner_stopped_by_a_signal_exits_nonzero(tmp_path, monkeypatch):
    """SIGTERM or SIGINT (a KeyboardInterrupt in the program) leaves the job unfinished: a script or
    supervisor must not read it as done."""
    import clicooper.programs
    from clicooper.cli import EXIT_INTERRUPTED

    def stopped(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(clicooper.programs, "run_data_owner", stopped)
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "data_owner").mkdir()
    args = ["run", str(tmp_path / "manifest.json"), "--identity", str(tmp_path / "data_owner")]
    args += ["--run-dir", str(tmp_path / "run")]
    r = runner.invoke(app, args)
    assert r.exit_code == EXIT_INTERRUPTED, r.output
