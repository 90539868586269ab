"""The documentation site builds with `mkdocs build --strict`: a broken link, a missing page or
anchor, or an API reference to an object that no longer exists fails the test command."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "mkdocs.yml")


def _build(config: str, site: str) -> subprocess.CompletedProcess:
    # No -q: it silences the warnings that --strict counts, and the build then passes whatever they say.
    # NO_MKDOCS_2_WARNING: mkdocs-material's banner about its successor, not a problem of this site.
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", config, "-d", site],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    res = _build(CONFIG, str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def test_the_site_builds_strict(site):
    assert (site / "index.html").exists()


@pytest.mark.parametrize("page, anchor", [
    ("api/ops", "pareto_lora.ops.integrate"),
    ("api/ops", "pareto_lora.rules.RuleSpec"),
    ("api/training", "pareto_lora.training.two_objective.ParetoLoRA"),
    ("api/distributed", "pareto_lora.distributed.sharded_integrate"),
])
def test_the_api_reference_is_generated_from_the_docstrings(site, page, anchor):
    assert f'id="{anchor}"' in (site / page / "index.html").read_text()


def test_the_api_reference_shows_the_loose_rule_keywords_of_paretolora(site):
    # ParetoLoRA.__init__ is written with one rule_params dict; the page shows what a caller passes.
    import html
    import re

    text = html.unescape(re.sub(r"<[^>]+>", "", (site / "api" / "training" / "index.html").read_text()))
    assert "tau: float | None = None, num_groups" in text
    assert "symmetric: bool | None = None, margin: float | None = None" in text and "rule_params" not in text


def test_the_architecture_page_shows_the_contracts(site):
    # One source: the page includes pyproject.toml's [tool.importlinter] section, not a copy of it.
    html = (site / "architecture" / "index.html").read_text()
    assert "tool.importlinter" in html and "acyclic_siblings" in html


def test_a_broken_reference_fails_the_build(tmp_path):
    import yaml

    with open(CONFIG) as f:
        cfg = yaml.safe_load(f)
    cfg["docs_dir"] = os.path.join(ROOT, "docs")
    cfg["hooks"] = [os.path.join(ROOT, h) for h in cfg.get("hooks", [])]  # paths relative to the config file
    cfg["nav"] = [*cfg["nav"], {"Missing": "no_such_page.md"}]
    broken = tmp_path / "mkdocs.yml"
    broken.write_text(yaml.safe_dump(cfg))
    res = _build(str(broken), str(tmp_path / "site"))
    assert res.returncode != 0 and "no_such_page.md" in res.stdout + res.stderr, res.stdout + res.stderr


def test_sphinx_roles_render_as_code(site):
    # docs/hooks.py: the docstrings' :class:`X` show as X in code, without the role name.
    html = (site / "api" / "balancers" / "index.html").read_text()
    assert "<code>BalancedSync" in html or "<code>base.BalancedSync" in html
    assert ":class:" not in html and ":mod:" not in html
