"""The project's declarative files agree with the code: one place for each fact, checked."""

import re

import yaml

from tests.conftest import ROOT
from training.config import TrainConfig
from training.train import build_parser


def test_conda_env_lists_exactly_the_pinned_requirements():
    requirements = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_section == requirements
    assert "torch==2.14.1" in requirements and "torchvision==0.29.1" in requirements


def test_mlproject_train_parameters_match_the_cli_and_config():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    train = project["entry_points"]["train"]
    params = set(train["parameters"])
    assert params == set(TrainConfig.field_names())
    cli_flags = {a.dest for a in build_parser()._actions} - {"help", "no_progress"}
    assert params == cli_flags
    for name in params:
        assert re.search(rf"--{name.replace('_', '-')} \{{{name}\}}", train["command"]), name
    defaults = TrainConfig()
    for name, spec in train["parameters"].items():
        if name in ("dropout", "model_kwargs"):
            continue
        assert str(spec["default"]) == str(getattr(defaults, name)) or float(spec["default"]) == getattr(defaults, name)


def test_every_entry_point_passes_each_parameter_to_its_command():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == {"train", "register", "export", "main", "deploy", "sweep", "benchmark"}
    for name, entry in project["entry_points"].items():
        for param in entry.get("parameters", {}):
            assert f"{{{param}}}" in entry["command"], (name, param)
