"""The README's commands, .ci/run and the generated recipe reference stay in step with the code."""

import re

from conftest import ROOT


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)[:2]


def test_ci_runs_the_readme_test_command():
    install_run, test = _readme_commands()
    assert "rlhf pipeline recipes/tiny/pipeline.yaml" in install_run and "pytest" in test
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()
    assert ci[-1] == test


def test_config_reference_is_current():
    from rlhf.config import reference_markdown

    assert (ROOT / "docs/config-reference.md").read_text().strip() == reference_markdown().strip()


def test_every_config_field_is_documented():
    from rlhf.config import STAGES, field_docs

    for cls in STAGES.values():
        for name, _, _, doc in field_docs(cls):
            assert doc, f"{cls.__name__}.{name} has no docstring"


def test_recipes_load():
    from rlhf.config import load_stage_config

    load_stage_config("pipeline", ROOT / "recipes/tiny/pipeline.yaml")
    for stage in ("sft", "rm", "ppo"):
        load_stage_config(stage, ROOT / f"recipes/tiny/{stage}.yaml")
    load_stage_config("ppo", ROOT / "recipes/tiny/ppo_reward_fn.yaml")
    for recipe in ROOT.glob("recipes/*/pipeline.yaml"):
        load_stage_config("pipeline", recipe)
    import json

    for ds in ROOT.glob("recipes/deepspeed/*.json"):
        assert json.loads(ds.read_text())["zero_optimization"]["stage"] in (2, 3)


def test_ppo_doc_lists_every_field():
    from rlhf.config import PPOConfig, field_table

    assert field_table(PPOConfig) in (ROOT / "docs/ppo.md").read_text()


def test_relative_links_in_docs_resolve():
    """The docs' 'build check': every relative link in README.md and docs/*.md points at a file."""
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"
