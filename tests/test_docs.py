"""The front door: README, docs/ and examples/ say what the code does.

CI builds the site (`mkdocs build --strict`), runs every example with
`--small` and every block marked `<!-- run -->` (`.ci/doc_blocks.py`);
these tests are the cheap checks beside those runs.
"""

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import keras_adam_plus
import tuning
from tuning import report
from tuning.cli import sweep_parser

pytestmark = pytest.mark.quick

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _doc_blocks():
    spec = importlib.util.spec_from_file_location(
        "doc_blocks", ROOT / ".ci" / "doc_blocks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_documents_every_option_and_the_output():
    page = (DOCS / "tuning" / "cli.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| `-")]
    documented = set(re.findall(r"`(--[a-z-]+)", "\n".join(rows)))
    options = {s for a in sweep_parser()._actions for s in a.option_strings
               if s.startswith("--") and s != "--help"}
    assert documented == options
    for row in rows:  # every row states its default (a cell, maybe empty)
        assert row.count("|") >= 4, row
    assert "objective val_loss, minimised; score = its value at a trial's " \
        "best epoch" in page
    assert "`<objective>_at_best_epoch`" in page
    assert report.score_column("val_loss") == "val_loss_at_best_epoch"


def test_api_reference_names_every_public_name():
    pages = {"keras_adam_plus": keras_adam_plus, "tuning": tuning}
    for page, module in pages.items():
        text = (DOCS / "api" / f"{page}.md").read_text()
        for name in module.__all__:
            assert re.search(rf"(::: [\w.]*\b{name}\b|`{page}\.{name}`)",
                             text), f"{page}.{name} is not in docs/api/"


def test_runnable_blocks_are_marked_well_and_cover_the_readme():
    doc_blocks = _doc_blocks()
    found = {path.relative_to(ROOT).as_posix(): list(doc_blocks.blocks(path))
             for path in doc_blocks.pages()}
    assert found["README.md"], "the README's example is not marked runnable"
    languages = {lang for blocks in found.values() for _, lang, _ in blocks}
    assert languages <= set(doc_blocks.RUNNERS)
    assert sum(map(len, found.values())) >= 10


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(((?:docs|examples)/[^)#]*)", text):
        assert (ROOT / target).exists(), target


def test_every_example_takes_small_and_runs_in_ci():
    ci = (ROOT / ".ci" / "run").read_text()
    listed = (DOCS / "examples.md").read_text()
    for script in sorted((ROOT / "examples").glob("*.py")):
        assert "--small" in script.read_text(), script.name
        assert re.search(rf"example \w+ {script.name} --small|"
                         rf"example \"\$backend\" {script.name} --small",
                         ci), f"{script.name} is not run by .ci/run"
        assert f"examples/{script.name}" in listed, script.name


def _args(obj):
    """{argument: its text} of the `Args:` section of `obj`'s docstring."""
    doc = inspect.getdoc(obj)
    section = doc.split("Args:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n(?=    [\w*]+(?:, \w+)*:)", "\n" + section)
    found = {}
    for entry in filter(None, (e.strip() for e in entries)):
        names, text = entry.split(":", 1)
        for name in names.split(", "):
            found[name.strip("*")] = " ".join(text.split())
    return found


# Public callables whose every defaulted argument says "Defaults to ..."
# (STYLE.md 6).
DEFAULTS_STATED = [tuning.sweep, tuning.confirm, keras_adam_plus.BetaDecay,
                   tuning.SearchSpace, tuning.AdamPlusHyperModel]


@pytest.mark.parametrize("obj", DEFAULTS_STATED,
                         ids=lambda obj: obj.__name__)
def test_public_docstrings_state_every_default(obj):
    documented = _args(obj)
    for name, parameter in inspect.signature(obj).parameters.items():
        if parameter.default is inspect.Parameter.empty:
            continue
        assert name in documented, f"{obj.__name__}: {name} undocumented"
        assert "Defaults to" in documented[name], (obj.__name__, name)


@pytest.mark.parametrize("script,module", [("torch_custom_loop.py", "torch"),
                                           ("jax_custom_loop.py", "jax")])
def test_a_backend_example_without_its_framework_is_one_line(script, module):
    # Was: a 43-line traceback ending in ModuleNotFoundError (a new user).
    import subprocess
    import sys

    hide = (f"import runpy, sys; sys.modules[{module!r}] = None; "
            f"runpy.run_path({str(ROOT / 'examples' / script)!r}, "
            "run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", hide], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [
        f"this example needs {'PyTorch' if module == 'torch' else 'JAX'}: "
        f'pip install -c .ci/constraints.txt -e ".[{module}]"']
