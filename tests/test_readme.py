"""The README and docs/ stay true: every Python snippet in the README runs, every command line
in the README and docs/ parses with today's CLI, every relative link and anchor resolves, the
make targets named exist, the README stays short, and each docs page says whom it is for."""

import re
import shlex
from pathlib import Path

import pytest
import torch

from moe_balance.harness.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The hand-written pages; the report.md files under docs/results/<study>/ are generated.
DOCS = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "results").glob("*.md"))
PAGES = [README, *DOCS]


def fenced(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_api_example_runs():
    blocks = fenced(README, "python")
    assert blocks, "README has no python example"
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    layer, out = namespace["layer"], namespace["out"]
    assert out.y.shape == (8, 128, 512)
    assert out.aux_loss.item() == 0.0
    # update_balancers ran once: the bias moved by exactly +/-u (or 0 for an exactly average expert)
    assert set(layer.expert_bias.abs().unique().tolist()) <= {0.0, torch.tensor(1e-3).item()}
    assert int(layer.balancers[0].num_updates) == 1


@pytest.mark.parametrize("index", range(len(fenced(README, "python"))))
def test_every_readme_python_block_runs(index):
    exec(compile(fenced(README, "python")[index], f"README.md block {index}", "exec"), {})


def cli_lines(path: Path) -> list[str]:
    """`moe-balance ...` and `torchrun ... -m moe_balance ...` lines of the page's sh blocks."""
    found = []
    for block in fenced(path, "sh"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
            if line.startswith("moe-balance ") or (line.startswith("torchrun ") and "-m moe_balance" in line):
                found.append(line)
    return found


def cli_argv(line: str) -> list[str]:
    """The argv the harness's parser sees; [optional] brackets in a usage line are dropped."""
    words = shlex.split(line.replace("[", " ").replace("]", " "))
    if words[0] == "torchrun":
        words = words[words.index("-m") + 1:]
    assert words[0] in ("moe-balance", "moe_balance"), line
    return words[1:]


ALL_CLI_LINES = [(p.relative_to(ROOT).as_posix(), line) for p in PAGES for line in cli_lines(p)]


def test_the_pages_show_command_lines():
    pages = {page for page, _ in ALL_CLI_LINES}
    assert {"README.md", "docs/paper.md", "docs/cli.md"} <= pages
    assert len(cli_lines(README)) >= 8


@pytest.mark.parametrize(("page", "line"), ALL_CLI_LINES)
def test_every_command_line_parses(page, line):
    parser = build_parser()
    try:
        args = parser.parse_args(cli_argv(line))
    except SystemExit as exc:  # argparse prints the problem to stderr
        pytest.fail(f"{page}: `{line}` does not parse (exit {exc.code})")
    assert args.command == cli_argv(line)[0]


def test_a_wrong_command_line_is_caught():
    """The check above can fail: a misspelled flag does not parse."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(cli_argv("moe-balance compare --metods aux_loss --out x"))


def test_make_targets_named_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))
    named = {t for p in PAGES for t in re.findall(r"`make (\w+)`", p.read_text())}
    named |= {t for p in PAGES for b in fenced(p, "sh") for t in re.findall(r"^make (\w+)", b, flags=re.M)}
    assert {"demo", "test"} <= named
    assert named <= targets, f"make targets named but missing: {sorted(named - targets)}"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]


def test_the_pages_link_to_each_other():
    assert sum(len(links(p)) for p in PAGES) > 50
    assert {"docs/paper.md", "docs/api.md", "docs/controller.md", "docs/results/index.md"} <= set(links(README))


def test_slug_matches_github():
    assert slug("Section 5.2: expert choice's leak") == "section-52-expert-choices-leak"
    assert slug("The quick preset: `make demo` and the 8-seed comparison") == \
        "the-quick-preset-make-demo-and-the-8-seed-comparison"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_and_anchors_resolve(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link to {target} points at nothing"
        if anchor:
            assert dest.suffix == ".md" and anchor in anchors(dest), f"{page.name}: no heading for {target}"


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 280


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_docs_page_says_whom_it_is_for(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# "), f"{page.name} has no title"
    first = next(line for line in lines[1:] if line.strip())
    assert first.startswith("For: "), f"{page.name} does not start with who it is for"


def test_every_results_study_is_in_the_index():
    index = (ROOT / "docs" / "results" / "index.md").read_text()
    for page in (ROOT / "docs" / "results").glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"{page.name} is missing from docs/results/index.md"
