import json
from pathlib import Path

import pytest

from fastsample.cli import main
from fastsample.config import ConfigError, ExperimentConfig, apply_overrides, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_config_parses_into_frozen_dataclasses():
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.nfe == [5, 10, 20] and cfg.model.kind == "gmm_digits"
    with pytest.raises(Exception, match="cannot assign"):
        cfg.name = "x"


def test_unknown_keys_and_bad_values_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"unknown config key 'solverz'; allowed keys: .*solvers"):
        config_from_dict(ExperimentConfig, {"solverz": ["ddim"]})
    with pytest.raises(ConfigError, match=r"unknown config key 'model.kindd'"):
        config_from_dict(ExperimentConfig, {"model": {"kindd": "x"}})
    with pytest.raises(ConfigError, match=r"process.kind='vp_quadratic' is not allowed; choose one of: vp_linear"):
        config_from_dict(ExperimentConfig, {"process": {"kind": "vp_quadratic"}})
    with pytest.raises(ConfigError, match=r"nfe\[1\] must be of type int; got 'ten'"):
        config_from_dict(ExperimentConfig, {"nfe": [5, "ten"]})
    with pytest.raises(ConfigError, match="num_samples must be >= 1"):
        config_from_dict(ExperimentConfig, {"num_samples": 0})
    with pytest.raises(ConfigError, match="must look like key=value"):
        apply_overrides({}, ["nfe"])


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides({"model": {"seed": 0}}, ["model.seed=3", "nfe=[4, 8]", "schedule=karras"])
    cfg = config_from_dict(ExperimentConfig, data)
    assert cfg.model.seed == 3 and cfg.nfe == [4, 8] and cfg.schedule == "karras"


def test_cli_run_writes_a_fresh_results_folder(tmp_path, capsys):
    args = [str(ROOT / "configs" / "quickstart.yaml"), "model.kind=gmm_ring", "model.n_components=4",
            "solvers=[ddim, heun]", "nfe=[4, 8]", "num_samples=64", f"output_dir={tmp_path}", "--quiet"]
    assert main(["run", *args]) == 0
    assert main(["run", *args]) == 0  # a second run never overwrites the first
    folders = sorted(p for p in tmp_path.iterdir())
    assert len(folders) == 2 and not any(p.name.endswith(".partial") for p in folders)
    for folder in folders:
        for name in ("config.yaml", "environment.json", "metrics.json", "metrics.csv", "table.md",
                     "error_vs_nfe.png"):
            assert (folder / name).is_file(), name
    rows = json.loads((folders[0] / "metrics.json").read_text())
    heun4 = next(r for r in rows if r["solver"] == "heun" and r["nfe_budget"] == 4)
    assert heun4["nfe"] == 4 and heun4["steps"] == 2
    ddim = [r["rmse"] for r in rows if r["solver"] == "ddim"]
    assert ddim[1] < ddim[0]  # more steps, closer to the reference
    assert "| ddim |" in capsys.readouterr().out


def test_cli_reports_config_errors(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs" / "quickstart.yaml"), "solverz=[ddim]"]) == 2
    assert "unknown config key 'solverz'" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2


def test_cli_sample_writes_samples(tmp_path):
    import numpy as np

    out = tmp_path / "s.npy"
    assert main(["sample", str(ROOT / "configs" / "quickstart.yaml"), "model.kind=gmm_ring",
                 "model.n_components=8", "num_samples=16", "--out", str(out)]) == 0
    assert np.load(out).shape == (16, 2)
