"""The ``synther`` command: upsample / report end to end on a tiny dataset, delegates, errors."""

from __future__ import annotations

import json
import sys
import types
from importlib import metadata

import numpy as np
import pytest

from synther_buffer import cli
from synther_buffer.datasets import load_transitions




@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    n = 200
    obs = rng.standard_normal((n, 3)).astype(np.float32)
    np.savez(d / "real.npz", observations=obs, actions=rng.uniform(-1, 1, (n, 2)).astype(np.float32),
             rewards=rng.standard_normal(n).astype(np.float32), next_observations=obs + 0.1,
             terminals=(np.arange(n) % 20 == 0).astype(np.float32))
    return d


TINY = ["--preset", "tiny", "--train-steps", "100", "--quiet"]


def test_upsample_then_report_end_to_end(dataset, capsys, monkeypatch):
    out, model = dataset / "syn.npz", dataset / "m.pt"
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--num-samples", "50", "--out", str(out),
                   "--chunk-size", "16", "--save-model", str(model), "--seed", "1", "--device", "cpu"] + TINY)
    text = capsys.readouterr().out
    assert rc == 0
    assert "compression (seed Table 5)" in text and "200 rows x 10 dims" in text and "4 chunks" in text
    got = load_transitions(out)
    assert len(got["observations"]) == 50 and model.exists()
    js = json.loads((dataset / "syn.compression.json").read_text())
    assert js["compression"]["original_floats"] == 2000 and js["config"]["seed"] == 1
    assert js["config"]["train_steps"] == 100 and js["model_terminals"]

    # a 50-50 mixture from the saved model (no refit), written as HDF5
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--num-samples", "40", "--out", str(dataset / "mix.h5"),
                   "--load-model", str(model), "--mix", "0.5", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "20 real, 20 synthetic" in text

    # flags that only shape a new fit are refused with --load-model, not silently ignored
    for flag in (["--preset", "paper"], ["--train-steps", "50"], ["--precision", "bf16"], ["--compile"]):
        rc = cli.main(["upsample", str(dataset / "real.npz"), "--num-samples", "40", "--out",
                       str(dataset / "no.npz"), "--load-model", str(model), *flag, "--quiet"])
        assert rc == 2 and f"{flag[0]} would be ignored" in capsys.readouterr().err
    assert not (dataset / "no.npz").exists()

    # --action-bounds clips the synthetic actions (negative numbers parse as values) and says how many
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--num-samples", "30", "--out", str(dataset / "clip.npz"),
                   "--load-model", str(model), "--action-bounds", "-0.25", "0.25", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0 and "clipped to --action-bounds:" in text and "outside the real data's range" in text
    assert (np.abs(load_transitions(dataset / "clip.npz")["actions"]) <= 0.25).all()
    assert json.loads((dataset / "clip.compression.json").read_text())["action_bounds"] == [[-0.25] * 2, [0.25] * 2]

    for bad in ("0", "-5"):
        assert cli.main(["report", str(dataset / "real.npz"), str(out), "--max-rows", bad]) == 2
        assert "--max-rows must be >= 1" in capsys.readouterr().err
    rc = cli.main(["report", str(dataset / "real.npz"), str(out), "--env-id", "Hopper-v5"])
    text = capsys.readouterr().out
    assert rc == 0
    assert (dataset / "syn.report.png").exists() and (dataset / "syn.report.json").exists()
    assert "terminal rate: real 0.050000" in text and "reward" in text
    assert "fidelity scoring skipped" in text and "not available for 'Hopper-v5'" in text

    # without MuJoCo (the envs extra) the report is still made, and says what to install
    monkeypatch.setitem(sys.modules, "mujoco", None)
    rc = cli.main(["report", str(dataset / "real.npz"), str(out), "--env-id", "HalfCheetah-v5"])
    text = capsys.readouterr().out
    assert rc == 0 and "max |dmean|/std" in text
    assert 'fidelity scoring for --env-id skipped' in text and 'pip install "synther-buffer[envs]"' in text


def test_report_custom_out(dataset, capsys):
    rc = cli.main(["report", str(dataset / "real.npz"), str(dataset / "real.npz"), "--out",
                   str(dataset / "sub" / "r.png")])
    assert rc == 0 and (dataset / "sub" / "r.png").exists() and (dataset / "sub" / "r.json").exists()
    assert "max |dmean|/std 0.000" in capsys.readouterr().out


def test_bad_inputs_exit_2(dataset, capsys, tmp_path):
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.csv")] + TINY)
    assert rc == 2 and "unknown output type" in capsys.readouterr().err
    rc = cli.main(["upsample", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o.npz")] + TINY)
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.npz"), "--mix", "1.5"] + TINY)
    assert rc == 2 and "mix" in capsys.readouterr().err
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.npz"), "--threads", "0"] + TINY)
    assert rc == 2 and "--threads" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["upsample", str(dataset / "real.npz")])          # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.npz"), "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        cli.main([])


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "{upsample,report,train}" in text
    for name in ("upsample", "report", "train"):
        assert name in text
    assert "bench" not in text   # only working commands are listed


def test_missing_delegate_is_reported(monkeypatch, capsys):
    monkeypatch.setitem(cli.DELEGATES, "train", ("synther_buffer._no_such_train_module",))
    assert cli.main(["train", "--anything"]) == 1
    assert "`synther train` is not available" in capsys.readouterr().err


def test_delegate_gets_its_arguments(monkeypatch):
    fake = types.ModuleType("fake_delegate")
    seen = {}
    fake.add_arguments = lambda p: p.add_argument("--env", default="x")
    fake.run = lambda args: seen.setdefault("env", args.env) and 0
    monkeypatch.setitem(sys.modules, "fake_delegate", fake)
    monkeypatch.setitem(cli.DELEGATES, "fake", ("fake_delegate",))
    assert cli.main(["fake", "--env", "cheetah-run"]) == 0
    assert seen == {"env": "cheetah-run"}
    # other subcommands never import the delegate
    monkeypatch.setitem(cli.DELEGATES, "fake", ("synther_buffer._must_not_be_imported",))
    cli.build_parser(["report", "a", "b"])


def test_bench_is_gone(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench"])
    assert e.value.code == 2 and "invalid choice: 'bench'" in capsys.readouterr().err


def test_bad_worker_flags_exit_2_before_training(dataset, tmp_path, capsys, monkeypatch):
    from synther_buffer import TransitionDiffusion
    monkeypatch.setattr(TransitionDiffusion, "fit", lambda *a, **k: pytest.fail("trained before checking"))
    base = ["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.npz")] + TINY
    for extra, msg in ((["--workers", "0"], "--workers must be >= 1"), (["--workers", "-2"], "--workers must be >= 1"),
                       (["--ray", "auto"], "--ray needs --workers"),
                       (["--cpus-per-worker", "2"], "--cpus-per-worker needs --workers"),
                       (["--max-retries", "1"], "--max-retries needs --workers"),
                       (["--workers", "2", "--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
                       (["--workers", "2", "--cpus-per-worker", "nan"], "--cpus-per-worker must be > 0"),
                       (["--workers", "2", "--max-retries", "-1"], "--max-retries must be >= 0")):
        assert cli.main(base + extra) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert not list(tmp_path.iterdir())


def test_workers_without_ray_exits_1_naming_the_extra(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    rc = cli.main(["upsample", str(dataset / "real.npz"), "--out", str(tmp_path / "o.npz"), "--workers", "2"] + TINY)
    err = capsys.readouterr().err
    assert rc == 1 and 'pip install "synther-buffer[distributed]"' in err and "'ray'" in err
    assert not list(tmp_path.iterdir())


def test_missing_extra_exits_1_naming_it(dataset, tmp_path, monkeypatch, capsys):
    (tmp_path / "x.hdf5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    rc = cli.main(["upsample", str(tmp_path / "x.hdf5"), "--out", str(tmp_path / "o.npz")] + TINY)
    err = capsys.readouterr().err
    assert rc == 1 and 'pip install "synther-buffer[offline]"' in err and "'h5py'" in err
    assert not (tmp_path / "o.npz").exists()

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # report's histograms
    rc = cli.main(["report", str(dataset / "real.npz"), str(dataset / "real.npz"), "--out", str(tmp_path / "r.png")])
    assert rc == 1 and 'pip install "synther-buffer[offline]"' in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_compile_flag_reaches_the_config():
    argv = ["upsample", "real.npz", "--out", "syn.npz", "--preset", "tiny"]
    plain = cli._config(cli.build_parser(argv).parse_args(argv))[0]
    compiled = cli._config(cli.build_parser(argv).parse_args(argv + ["--compile"]))[0]
    assert plain.compile is False and compiled.compile is True
    assert compiled.replace(compile=False) == plain          # nothing else changes


def test_precision_flag_reaches_the_config(capsys):
    argv = ["upsample", "real.npz", "--out", "syn.npz", "--preset", "tiny"]
    plain = cli._config(cli.build_parser(argv).parse_args(argv))[0]
    bf16 = cli._config(cli.build_parser(argv).parse_args(argv + ["--precision", "bf16"]))[0]
    assert plain.precision == "fp32" and bf16.precision == "bf16"
    assert bf16.replace(precision="fp32") == plain           # nothing else changes
    with pytest.raises(SystemExit):
        cli.build_parser(argv).parse_args(argv + ["--precision", "fp16"])
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_declared():
    eps = [e for e in metadata.entry_points(group="console_scripts") if e.name == "synther"]
    assert eps and eps[0].value == "synther_buffer.cli:main"
