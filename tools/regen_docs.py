"""Regenerate the generated parts of docs/: the recipe reference and the PPO field table.

    python tools/regen_docs.py
"""

from pathlib import Path

from rlhf.config import PPOConfig, field_table, reference_markdown

ROOT = Path(__file__).resolve().parents[1]
(ROOT / "docs/config-reference.md").write_text(reference_markdown() + "\n")
ppo = ROOT / "docs/ppo.md"
text = ppo.read_text()
marker = "## Every config field\n"
ppo.write_text(text[: text.index(marker) + len(marker)] + "\n" + field_table(PPOConfig) + "\n")
print("regenerated docs/config-reference.md and the table in docs/ppo.md")
