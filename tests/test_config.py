"""Recipes: YAML -> dataclasses, dotted overrides, errors that name the key."""

import pytest

from rlhf.config import (ConfigError, PPOConfig, SFTConfig, apply_overrides, from_dict, load_stage_config,
                         parse_overrides)


def test_load_and_override(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("seed: 3\ntrain:\n  lr: 1e-3\n  batch_size: 16\nmodel:\n  name_or_path: foo\n")
    cfg = load_stage_config("sft", p, parse_overrides(["--train.lr", "5e-4", "--model.lora.enabled=true"]))
    assert isinstance(cfg, SFTConfig) and cfg.seed == 3
    assert cfg.train.lr == 5e-4 and cfg.train.batch_size == 16  # YAML '1e-3' string coerced, override wins
    assert cfg.model.lora.enabled is True and cfg.model.name_or_path == "foo"


def test_an_override_changes_only_the_section_it_names_when_yaml_anchors_share_a_block(tmp_path):
    """`rm.train: *train` gives both sections one YAML object: an override of sft.train.lr set the RM's
    too, and --rm.train.max_steps the SFT's (the SFT ran the RM's steps, and both recipe.yaml said so)."""
    p = tmp_path / "pipeline.yaml"
    p.write_text("sft:\n  train: &train {max_steps: 3, lr: 1.0e-3}\nrm:\n  train: *train\n")
    cfg = load_stage_config("pipeline", p, parse_overrides(["--sft.train.lr", "3e-3", "--rm.train.max_steps", "2"]))
    assert (cfg.sft.train.lr, cfg.sft.train.max_steps) == (3e-3, 3)
    assert (cfg.rm.train.lr, cfg.rm.train.max_steps) == (1e-3, 2)


def test_a_number_outside_float32s_range_is_refused(tmp_path):
    """reward_model_weight -1e300 is finite in Python but -inf times any RM score in float32: the
    run went on with NaN rewards."""
    p = tmp_path / "ppo.yaml"
    p.write_text("reward_model_weight: -1e300\n")
    with pytest.raises(ConfigError, match=r"ppo.yaml:1: reward_model_weight: '-1e300' is outside float32's range"):
        load_stage_config("ppo", p)
    with pytest.raises(ConfigError, match=r"reward_fns\[0\]\.weight: '1e39' is outside float32's range"):
        load_stage_config("ppo", None, parse_overrides(["--reward_fns", "[{fn: gold, weight: 1e39}]"]))
    assert load_stage_config("ppo", None, parse_overrides(["--kl_coef", "3e38"])).kl_coef == 3e38


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_stage_config("sft", p)
    with pytest.raises(ConfigError, match="unknown key 'kl_coeff'"):
        load_stage_config("ppo", None, {"kl_coeff": 0.1})
    # an unknown key under which the override names a deeper one is placed at that override, as others are
    from rlhf.config import where_set

    assert where_set("nosuch", None, {"nosuch.key": 1}) == "command line --nosuch.key"


@pytest.mark.parametrize("stage,key,meant", [
    ("sft", "learning_rate", "'train.lr'"),  # transformers' name, exactly (it had no suggestion)
    ("ppo", "init_kl_coef", "'kl_coef'"),
    ("sft", "train.learnig_rate", "'train.lr'"),  # a misspelling of transformers' name
    ("pipeline", "steps", "'ppo.steps'"),  # the shallowest, not 'ppo.rm_refresh.steps'
    ("pipeline", "lr", "'sft.train.lr', 'rm.train.lr', 'ppo.lr' or 'dpo.train.lr'"),  # every stage's
    ("pipeline", "ppo.learning_rate", "'ppo.lr'"),
])
def test_an_unknown_key_suggests_the_keys_meant(stage, key, meant):
    with pytest.raises(ConfigError, match=rf"^command line --{key}: unknown key '{key}' \(did you mean {meant}\?\)$"):
        load_stage_config(stage, "recipes/tiny/pipeline.yaml" if stage == "pipeline" else None, {key: 1})


def test_a_whole_section_given_on_the_command_line_names_the_keys_it_drops(caplog):
    """`--model '{name_or_path: x}'` replaces the recipe's model section, as YAML would: its
    init: from_config and arch are gone. That stays (launch scripts give whole sections), but the
    dropped keys are named; a section that keeps every key, or a dotted key, says nothing."""
    cfg = load_stage_config("sft", "recipes/tiny/sft.yaml", {"model": {"name_or_path": "x"}})
    assert cfg.model.init == "pretrained" and cfg.model.name_or_path == "x"
    assert "command line --model replaces the recipe's whole 'model' section: model.init, model.arch, " \
           "model.tokenizer_vocab_size no longer set; give --model.KEY VALUE" in caplog.text
    caplog.clear()
    load_stage_config("sft", "recipes/tiny/sft.yaml", {"train.lr": 1e-3, "data": {
        "train": "recipes/tiny/data/sft.jsonl", "eval_split": 0.1, "max_length": 48, "skip_bad_rows": True}})
    assert "replaces" not in caplog.text
    # a pipeline's stage section, as typed (each stage reads it again: it said --model)
    load_stage_config("sft", "recipes/tiny/pipeline.yaml", {"sft.model": {"name_or_path": "x"}})
    assert "command line --sft.model replaces the recipe's whole 'sft.model' section: sft.model.init," in caplog.text
    assert "--model " not in caplog.text


@pytest.mark.parametrize("override,needle", [
    ({"train.batch_size": "many"}, "train.batch_size: expected an integer"),
    ({"train.lr": "fast"}, "train.lr: expected a number"),
    ({"model.lora.enabled": "maybe"}, "model.lora.enabled: expected true/false"),
    ({"train": 3}, "train: expected a mapping"),
    ({"data.train": {"a": 1}}, "data.train: expected"),
    # a list's item at fault is named with its index (it was "expected str | list[str] | None, got [...]")
    ({"data.train": ["a.jsonl", {"path": "x"}]}, "^command line --data.train: data.train[1]: expected a string, "
                                                 "got {'path': 'x'}$"),
])
def test_wrong_types_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        load_stage_config("sft", None, override)


def test_a_missing_file_in_a_list_of_data_files_is_named_by_its_place(tmp_path):
    from rlhf.data.formats import load_examples, parse_sft
    from rlhf.errors import DataError

    with pytest.raises(DataError, match=r"^data\.train\[1\]: 5: data file not found$"):
        load_examples(["recipes/tiny/data/sft.jsonl", "5"], parse_sft)
    with pytest.raises(DataError, match=r"^nope\.jsonl: data file not found$"):  # (one file: its name says it)
        load_examples("nope.jsonl", parse_sft)


def test_pipeline_sections_and_prefixed_overrides(tmp_path):
    p = tmp_path / "pipe.yaml"
    p.write_text("seed: 7\nsft:\n  train: {lr: 0.1}\nppo:\n  kl_coef: 0.2\n  reward_fns: [{fn: gold, weight: 2}]\n")
    ppo = load_stage_config("ppo", p, {"ppo.kl_coef": 0.05})
    assert isinstance(ppo, PPOConfig) and ppo.kl_coef == 0.05 and ppo.seed == 7
    assert ppo.reward_fns[0].fn == "gold" and ppo.reward_fns[0].weight == 2.0
    pipe = load_stage_config("pipeline", p, {"seed": 1})
    assert pipe.sft.train.lr == 0.1 and pipe.sft.seed == 1 and pipe.rm.seed == 1
    with pytest.raises(ConfigError, match="unknown key 'rmm'"):
        p.write_text("rmm: {}\nsft: {}\n")
        load_stage_config("sft", p)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml:.*invalid YAML"):
        load_stage_config("sft", p)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_stage_config("sft", tmp_path / "none.yaml")


def test_parse_overrides():
    assert parse_overrides(["--a.b", "1", "--c=x", "--d", "[1, 2]"]) == {"a.b": 1, "c": "x", "d": [1, 2]}
    with pytest.raises(ConfigError):
        parse_overrides(["--a"])
    with pytest.raises(ConfigError):
        parse_overrides(["a", "1"])


def test_from_dict_roundtrip():
    from rlhf.config import to_dict

    cfg = from_dict(PPOConfig, {"reward_fns": [{"fn": "x.py:f"}], "data": {"train": ["a", "b"]}})
    again = from_dict(PPOConfig, to_dict(cfg))
    assert again == cfg and again.data.train == ["a", "b"]
    assert apply_overrides({}, {"a.b.c": 1}) == {"a": {"b": {"c": 1}}}
