"""The project's declarative files agree with the code: one place for each fact, checked."""

import pytest
import yaml

from tests.helpers.paths import ROOT
from training.cli import COMMANDS, build_parser
from training.core.config import TrainConfig
from training.core.options import mlproject_type

# MLproject entry point -> CLI sub-command
ENTRY_POINTS = {
    "train": "train",
    "sweep": "sweep",
    "benchmark": "leaderboard",
    "main": "pipeline",
    "register": "register",
    "export": "export",
    "deploy": "deploy",
    "classical": "classical",
    "ensemble": "ensemble",
    "robustness": "robustness",
    "study": "study",
}


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


def subcommand_actions(name: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    return {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "no_progress")}


def field_types(command: str) -> dict[str, str]:
    types = {name: mlproject_type(TrainConfig, name) for name in TrainConfig.field_names()}
    for cls in COMMANDS[command].options:
        types.update({name: mlproject_type(cls, name) for name in cls.__dataclass_fields__})
    return types


@pytest.mark.parametrize("entry_point, command", ENTRY_POINTS.items())
def test_mlproject_parameters_equal_the_cli_in_name_type_and_default(entry_point, command):
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry_point]
    actions, types = subcommand_actions(command), field_types(command)
    declared = set(entry["parameters"])
    assert entry["command"].split()[:4] == ["python", "-m", "training.cli", command]
    # Every option of the command is declared, except training parameters that fall back to the recipe:
    # `mlflow run` passes those as --name value when given, and the CLI accepts that spelling.
    undeclared = set(actions) - declared
    assert declared <= set(actions), entry_point
    assert undeclared <= set(TrainConfig.field_names()), undeclared
    for name in undeclared:
        assert f"--{name}" in actions[name].option_strings, name
    if COMMANDS[command].trains:
        assert "recipe" in declared
    for name, spec in entry["parameters"].items():
        action = actions[name]
        assert f"--{name.replace('_', '-')} {{{name}}}" in " ".join(entry["command"].split()), name
        assert spec["type"] == types[name], (name, spec["type"], types[name])
        if action.required:
            assert "default" not in spec, name
        else:
            default = spec["default"]
            assert str(default).lower() == str(action.default).lower() or float(default) == float(action.default), (
                name,
                default,
                action.default,
            )


def test_mlproject_has_exactly_the_cli_entry_points():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == set(ENTRY_POINTS)
    assert set(ENTRY_POINTS.values()) == {name for name, command in COMMANDS.items() if command.entry_point}


def test_layering_contracts_hold_and_there_is_no_import_cycle(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(no_cache=True, no_logo=True) == 0, capsys.readouterr().out[-3000:]
    assert "11 kept, 0 broken" in capsys.readouterr().out


def test_no_module_of_ours_imports_itself_back_through_others():
    """No import cycle, function-level imports counted (grimp's graph, as import-linter builds it)."""
    import grimp

    graph = grimp.build_graph("training", "zoo", "contract", "serving")
    ours = {m for m in graph.modules if m.split(".")[0] in ("training", "zoo", "contract", "serving")}
    for module in sorted(ours):
        for imported in graph.find_modules_directly_imported_by(module) & ours:
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            assert chain is None, f"cycle: {module} -> {' -> '.join(chain)}"


def test_the_shipped_search_space_loads_for_every_model_it_names():
    from training.workflows.search_space import DEFAULT_SPACE_FILE, load_space

    document = yaml.safe_load(DEFAULT_SPACE_FILE.read_text())
    for model in ["mlp", "cnn", "alexnet", "resnet18", "mobilenetv2", *document["models"]]:
        dimensions = load_space(model, DEFAULT_SPACE_FILE)
        assert {"lr", "batch_size", "weight_decay", "optimizer"} <= {d.name for d in dimensions}, model


def test_every_recipe_search_variant_is_a_valid_training_config():
    from training.core.config import parse_model_kwargs
    from training.core.recipes import config_from_recipe

    plan = yaml.safe_load((ROOT / "benchmarks" / "recipe_search.yaml").read_text())
    resolved = set()
    for dataset, spec in plan.items():
        for name, values in spec["variants"].items():
            values = dict(values or {})
            if "model_kwargs" in values:
                values["model_kwargs"] = parse_model_kwargs(values["model_kwargs"])
            config = config_from_recipe(spec["base"], dataset=dataset, **values).validate()
            params = tuple(sorted(config.to_params().items()))
            assert params not in resolved, f"{dataset}: variant {name!r} repeats another variant"
            resolved.add(params)
