"""The README is a front door and the docs hold the rest; every command they show is one that works as written.

Commands that train or serve are run by the e2e tests; here each documented command line is checked against what
it calls: the CLI's parser, MLproject's entry points and parameters, the Makefile's targets, the benchmark files.
"""

import re
import shlex

import pytest
import yaml

from tests.helpers.paths import ROOT
from training.cli import build_parser, model_options
from training.core.config import TrainConfig
from training.core.recipes import markdown_table, scaled_table

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
MAKE_TARGETS = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def code_lines() -> list[tuple[str, str]]:
    """(page, command) for every shell command in a ```bash block, comments and continuation lines joined."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #", 1)[0].strip()
                if line and not line.startswith("#"):
                    for command in re.split(r"\s*(?:&&|;|\|\||&)\s*", line):
                        found.append((page.relative_to(ROOT).as_posix(), command.strip()))
    return found


COMMANDS = code_lines()


def words(command: str) -> list[str]:
    """The command's words, placeholders such as <run id> filled in, variable assignments before it dropped."""
    filled = re.sub(r"<[^>]+>", "0123456789abcdef", command)
    filled = re.sub(r"\$\([^)]*\)", "x", filled)
    parts = shlex.split(filled)
    while parts and re.match(r"^[A-Z_]+=", parts[0]):
        parts.pop(0)
    return parts


def test_the_readme_is_a_front_door_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"README does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("page, command", [c for c in COMMANDS if "training.cli" in c[1] or c[1].startswith("medzoo ")])
def test_documented_cli_commands_parse(page, command):
    argv = words(command)
    argv = argv[argv.index("training.cli") + 1 :] if "training.cli" in argv else argv[1:]
    if argv[-1:] == ["--help"] or not argv:
        return
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        model_options(extra)  # only --model.<option> VALUE may be left over


@pytest.mark.parametrize("page, command", [c for c in COMMANDS if c[1].startswith("mlflow run")])
def test_documented_mlflow_runs_name_real_entry_points_and_parameters(page, command):
    argv = words(command)
    entry = argv[argv.index("-e") + 1] if "-e" in argv else "main"
    assert entry in MLPROJECT, f"{page}: no entry point {entry!r}"
    allowed = set(MLPROJECT[entry]["parameters"]) | set(TrainConfig.field_names())
    for i, word in enumerate(argv):
        if word == "-P":
            name = argv[i + 1].split("=", 1)[0]
            assert name in allowed or name.startswith("model."), f"{page}: {entry} has no parameter {name!r}"


@pytest.mark.parametrize("page, command", [c for c in COMMANDS if c[1].startswith(("make ", "python benchmarks/"))])
def test_documented_make_targets_and_benchmarks_exist(page, command):
    argv = words(command)
    if argv[0] == "make":
        assert argv[1] in MAKE_TARGETS, f"{page}: no make target {argv[1]!r}"
    else:
        assert (ROOT / argv[1]).exists(), f"{page}: no {argv[1]}"


def test_the_training_page_lists_every_parameter_with_its_default():
    page = (ROOT / "docs" / "training.md").read_text()
    table = page.split("| parameter | default | meaning |", 1)[1].split("\n\n", 1)[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \| `?([^|`]*)`? \|", table, re.M)}
    params = TrainConfig().to_params()
    assert set(rows) == set(params)
    for name, text in rows.items():
        assert text.strip() == params[name], name


def test_the_training_page_recipe_table_is_the_recipes_file():
    page = (ROOT / "docs" / "training.md").read_text()
    section = page.split("<!-- recipes:start -->\n", 1)[1].split("\n<!-- recipes:end -->", 1)[0]
    assert section == markdown_table(), "docs/training.md recipe table is stale: paste recipes.markdown_table()"
    section = page.split("<!-- scaled:start -->\n", 1)[1].split("\n<!-- scaled:end -->", 1)[0]
    assert section == scaled_table(), "docs/training.md sizing table is stale: paste recipes.scaled_table()"
