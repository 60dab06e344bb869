"""Data formats, validation errors (file:line:field), K-way expansion, built-in tasks."""

import json
import re

import pytest

from rlhf.data import formats as F
from rlhf.data import tasks


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def load(path, parser, **kw):
    return F.load_examples(str(path), parser, **kw)


def test_sft_formats(tmp_path):
    p = write(tmp_path, "d.jsonl", [
        {"prompt": "hi", "completion": "there"},
        {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "x"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "y"}], "extra": 1},
    ])
    ex, stats = load(p, F.parse_sft)
    assert [e.prompt for e in ex][0] == [{"role": "user", "content": "hi"}]
    assert ex[0].completion == [{"role": "assistant", "content": "there"}]
    assert ex[2].prompt[-1]["content"] == "u" and len(ex[2].completion) == 3 and ex[2].meta == {"extra": 1}
    assert stats["rows"] == 3 and ex[1].where == f"{p}:2"


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "x"}, "field 'completion': missing"),
    ({"prompt": 3, "completion": "y"}, "field 'prompt': expected a string or a list"),
    ({"prompt": "", "completion": "y"}, "field 'prompt': empty string"),
    ({"messages": [{"role": "user", "content": "only"}]}, "field 'messages': no assistant message"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "field 'messages': conversation starts with the assistant"),
    ({"messages": "nope"}, "field 'messages': expected a non-empty list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]},
     "field 'messages[1].content': expected a string, got int"),
    ({"prompt": [{"role": "user"}], "completion": "y"}, "field 'prompt[0].content': missing"),
    ({"prompt": ["q"], "completion": "y"}, "field 'prompt[0]': expected a {role, content} message, got str"),
    ({"text": "x"}, "expected fields 'prompt' and 'completion', or 'messages'"),
])
def test_sft_validation_errors_name_file_line_field(tmp_path, row, needle):
    p = write(tmp_path, "d.jsonl", [{"prompt": "ok", "completion": "ok"}, row])
    with pytest.raises(F.DataError) as e:
        load(p, F.parse_sft)
    assert str(e.value).startswith(f"{p}:2") and needle in str(e.value)


def test_malformed_json_and_non_object(tmp_path):
    p = write(tmp_path, "d.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", '])
    with pytest.raises(F.DataError, match=r"d.jsonl:2: malformed JSON"):
        load(p, F.parse_sft)
    p2 = write(tmp_path, "e.jsonl", ['[1, 2]'])
    with pytest.raises(F.DataError, match=r"e.jsonl:1: a row must be a JSON object"):
        load(p2, F.parse_sft)


def test_skip_bad_rows_counts(tmp_path):
    p = write(tmp_path, "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a"}, {"prompt": 1, "completion": "c"}])
    ex, stats = load(p, F.parse_sft, skip_bad_rows=True)
    assert len(ex) == 1 and stats["skipped_bad_rows"] == 2


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(F.DataError, match="not found"):
        load(tmp_path / "nope.jsonl", F.parse_sft)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(F.DataError, match="empty dataset"):
        load(empty, F.parse_sft)


def test_json_and_parquet_and_folder(tmp_path):
    import datasets

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    ex, _ = load(tmp_path / "a.json", F.parse_sft)
    assert [e.completion[0]["content"] for e in ex] == ["c1", "c2"]
    ex, _ = load(tmp_path / "b.parquet", F.parse_sft)
    assert ex[1].prompt[0]["content"] == "p2"
    ex, _ = load(tmp_path, F.parse_sft)  # folder: both files
    assert len(ex) == 4


def test_a_json_array_keeps_its_values_and_names_the_line_of_a_bad_row(tmp_path):
    """A .json file is read as JSON, not through datasets, which retyped a column of mixed types
    ("01557" became 1557) and named a bad row by its index. A key twice in one object (JSON or
    JSON Lines) is an error naming the line, not the last value silently kept."""
    rows = [{"prompt": f"p{i}", "completion": "01557" if i == 1 else f"c{i}"} for i in range(12)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    ex, _ = load(tmp_path / "a.json", F.parse_sft)
    assert ex[1].completion[0]["content"] == "01557" and ex[1].where == f"{tmp_path / 'a.json'}:6"
    rows[10]["completion"] = 7
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2))
    with pytest.raises(F.DataError, match=r"a\.json:42: field 'completion': .* got int"):
        load(tmp_path / "a.json", F.parse_sft)
    for text, needle in (('[{"a": 1} {"b": 2}]', r"b\.json:1: malformed JSON \(expected ',' or '\]'\)"),
                         ('[{"a": 1},\n', r"b\.json:2: malformed JSON"), ("[1]", r"b\.json:1: a row must be a JSON object"),
                         ('[{"a": 1}]\nx', r"b\.json:1: malformed JSON \(text after the closing '\]'\)")):
        (tmp_path / "b.json").write_text(text)
        with pytest.raises(F.DataError, match=needle):
            F.read_rows(str(tmp_path / "b.json"))
    (tmp_path / "d.json").write_text('[\n{"prompt": "a", "completion": "b"},\n{"prompt": "a", "prompt": "b"}]')
    with pytest.raises(F.DataError, match=r"d\.json:3: duplicate key 'prompt' in one object"):
        F.read_rows(str(tmp_path / "d.json"))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": {"x": 1, "x": 2}}\n')
    with pytest.raises(F.DataError, match=r"d\.jsonl:1: duplicate key 'x' in one object"):
        F.read_rows(str(tmp_path / "d.jsonl"))
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows[:3]))  # JSON Lines, as datasets reads it
    assert [r.where() for r in F.read_rows(str(tmp_path / "c.json"))] == [f"{tmp_path / 'c.json'}:{i}" for i in (1, 2, 3)]
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r, indent=2) for r in rows[:3]))  # objects one after another
    assert [r.line for r in F.read_rows(str(tmp_path / "c.json"))] == [1, 5, 9]
    (tmp_path / "a.json").write_text(json.dumps(rows))  # on one line: each row's number too
    with pytest.raises(F.DataError, match=r"a\.json:1 \(row 11\): field 'completion': .* got int"):
        load(tmp_path / "a.json", F.parse_sft)


def test_preference_pairs_and_margin(tmp_path):
    p = write(tmp_path, "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 0.5}])
    (g,), _ = load(p, F.parse_preference)
    assert g.pairs == [(0, 1, 0.5)] and g.responses[0] == [{"role": "assistant", "content": "good"}]


def test_kway_ranking_expands_to_all_pairs_with_ties_dropped(tmp_path):
    p = write(tmp_path, "r.jsonl", [
        {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [2, 1, 4, 3]},
        {"prompt": "q2", "responses": ["a", "b", "c"], "scores": [1.0, 1.0, 0.0]},
    ])
    (g1, g2), stats = load(p, F.parse_preference)
    assert len(g1.pairs) == 6  # C(4, 2)
    order = {"b": 1, "a": 2, "d": 3, "c": 4}
    for w, l, _ in g1.pairs:
        assert order[g1.responses[w][0]["content"]] < order[g1.responses[l][0]["content"]]
    assert len(g2.pairs) == 2 and stats["tied_pairs"] == 1


def test_ranks_are_whole_numbers_from_one_and_all_tied_rows_are_counted(tmp_path):
    """Scores written under 'ranks' would train the RM inverted (rank 1 is the best): a rank that
    is not a whole number >= 1 names its field; a row whose responses all tie is dropped and
    counted (all_tied_rows), not lost silently."""
    for bad, shown in (([0.7, 0.2], "0.7"), ([1, -3], "-3"), ([2.5, 1], "2.5")):
        p = write(tmp_path, "r.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": bad}])
        with pytest.raises(F.DataError, match=rf"r\.jsonl:1: field 'ranks\[\d\]': a rank is a whole number >= 1 "
                                             rf"\(1 = best\), got {re.escape(shown)}"):
            load(p, F.parse_preference)
    p = write(tmp_path, "t.jsonl", [{"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]},
                                    {"prompt": "q", "responses": ["a", "b"], "scores": [0.5, 0.5]},
                                    {"prompt": "q", "responses": ["a", "b"], "ranks": [2, 1.0]}])
    groups, stats = load(p, F.parse_preference)
    assert len(groups) == 1 and stats["all_tied_rows"] == 2


def test_a_preference_compares_one_reply_not_several_turns(tmp_path):
    """A response of several messages would be cut to its first (the RM scores one reply), so two
    that differ only in a later turn would score the same: refused, naming the field."""
    a = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    u = {"role": "user", "content": "more?"}
    rows = [{"prompt": "Q", "chosen": [a("same"), u, a("GOOD")], "rejected": [a("same"), u, a("BAD")]},
            {"chosen": [u, a("same"), u, a("GOOD")], "rejected": [u, a("other"), u, a("BAD")]},
            {"prompt": "Q", "responses": ["x", [a("y"), u, a("z")]], "ranks": [1, 2]}]
    for i, (row, fld) in enumerate(zip(rows, ("chosen", "chosen", r"responses\[1\]"))):
        p = write(tmp_path, f"m{i}.jsonl", [row])
        with pytest.raises(F.DataError, match=rf"m{i}\.jsonl:1: field '{fld}': a response of 3 messages"):
            load(p, F.parse_preference)


def test_duplicate_responses_handled(tmp_path):
    p = write(tmp_path, "r.jsonl", [
        {"prompt": "q", "responses": ["a", "a", "b"], "scores": [1.0, 0.0, 0.5]},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
    ])
    groups, stats = load(p, F.parse_preference)
    assert len(groups) == 2
    assert len(groups[0].pairs) == 2  # (a>b), (b>a-dup) kept; (a vs a) dropped
    assert stats["duplicate_pairs"] == 2


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": "q", "responses": ["a"], "ranks": [1]}, "field 'responses': expected a list of at least 2"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "field 'ranks': expected a list of 2 numbers"),
    ({"prompt": "q", "responses": ["a", 3], "ranks": [1, 2]}, "field 'responses[1]': expected a string"),
    ({"prompt": "q", "responses": ["a", "b"]}, "field 'ranks': give exactly one of"),
    ({"prompt": "q", "responses": ["a", "b"], "scores": [1, "x"]}, "field 'scores[1]': expected a finite number"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "field 'margin': expected a finite number"),
    ({"chosen": "abc", "rejected": "xyz"}, "do not share their prompt"),
    ({"chosen": "Human: What is 2+2? Assistant: 4", "rejected": "Human: What is 3+3? Assistant: 6"},
     "field 'chosen': chosen and rejected do not share their prompt"),  # never split into "Human: What is "
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}], "chosen": "a",
      "rejected": "b"}, "field 'prompt[1].role': two user turns in a row"),
    ({"prompt": [{"role": "human", "content": "q"}], "chosen": "a", "rejected": "b"},
     "field 'prompt[0].role': unknown role 'human' (expected system, user, assistant, tool) (did you mean 'user'?)"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "field 'chosen': is null"),
    ({"prompt": [{"role": "user", "content": "q"}], "responses": ["a", "b"], "ranks": [1, 2],
      "extra": 1} | {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'prompt[1].role': the conversation ends on an assistant turn; a user or tool turn is expected here"),
])
def test_preference_validation_errors(tmp_path, row, needle):
    p = write(tmp_path, "p.jsonl", [row])
    with pytest.raises(F.DataError) as e:
        load(p, F.parse_preference)
    assert str(e.value).startswith(f"{p}:1") and needle in str(e.value)


def test_implicit_prompt_split_strings_hh_style(tmp_path):
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant: It is 4."
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: Fish."
    p = write(tmp_path, "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    (g,), _ = load(p, F.parse_preference)
    # as chat messages: the RM reads the template PPO will give it, not raw "Human:/Assistant:" text
    assert g.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert g.responses == ["It is 4.", "Fish."]
    turns = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sum?\n\nAssistant:"
    p = write(tmp_path, "hh2.jsonl", [{"chosen": turns + " 4", "rejected": turns + " 5"},
                                      {"chosen": "Q: x? Assistant: 4", "rejected": "Q: x? Assistant: 5"}])
    (g2, g3), _ = load(p, F.parse_preference)
    assert [m["role"] for m in g2.prompt] == ["user", "assistant", "user"] and g2.prompt[1]["content"] == "hello"
    assert g3.prompt == "Q: x? Assistant:"  # not an HH transcript: raw text, as given
    p = write(tmp_path, "hh3.jsonl", [{"chosen": turns + " 4\n\nHuman: ok", "rejected": turns + " 5"}])
    with pytest.raises(F.DataError, match=r"hh3\.jsonl:1: field 'chosen': the reply after the shared prompt holds"):
        load(p, F.parse_preference)


def test_implicit_prompt_split_messages(tmp_path):
    u = {"role": "user", "content": "hi"}
    p = write(tmp_path, "m.jsonl", [{"chosen": [u, {"role": "assistant", "content": "hello"}],
                                      "rejected": [u, {"role": "assistant", "content": "go away"}]}])
    (g,), _ = load(p, F.parse_preference)
    assert g.prompt == [u] and g.responses[1] == [{"role": "assistant", "content": "go away"}]


def test_train_eval_split_is_deterministic():
    tr, ev = F.split_train_eval(list(range(100)), 0.1, seed=3)
    tr2, ev2 = F.split_train_eval(list(range(100)), 0.1, seed=3)
    assert ev == ev2 and len(ev) == 10 and not set(tr) & set(ev)
    assert F.split_train_eval([7, 8], 0.05, seed=0) in (([7], [8]), ([8], [7]))  # at least one held out
    assert F.split_train_eval([7], 0.0, seed=0) == ([7], [])
    # one row and a split: it was held out, and the stage failed later with "needs training texts"
    with pytest.raises(F.DataError, match=r"'data\.eval_split' \(0\.05\) holds out all 1 rows, leaving none"):
        F.split_train_eval([7], 0.05, seed=0)


# ----------------------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_task_solve_and_systematic_error(name):
    import random

    t = tasks.get_task(name)
    rng = random.Random(0)
    for _ in range(50):
        x = t.draw(rng)
        assert tasks.is_correct(name, x, t.solve(x))
        assert not tasks.is_correct(name, x, t.systematic_error(x))
        assert t.hard_negative(x, rng) != t.solve(x)
        assert tasks.judge_one(name, x, t.solve(x)) == 1.0
        assert tasks.judge_one(name, x, t.systematic_error(x)) < 1.0


def test_sort_checker_hand_values():
    assert tasks.gold_reward(None, ["01557", "75510", " 01557 "], task=["sort"] * 3, input=["75051"] * 3) == [1.0, 0.0, 1.0]


def test_make_task_data(tmp_path):
    counts = tasks.make_task_data("sort,reverse", tmp_path, n_sft=200, n_pref=100, n_rank=10, n_rl=50, n_eval=40,
                                  wrong_share=0.5, seed=1)
    assert counts["sft.jsonl"] == 200 and counts["rankings.jsonl"] == 10
    sft = [json.loads(l) for l in open(tmp_path / "sft.jsonl")]
    wrong = sum(not r["demo_correct"] for r in sft) / len(sft)
    assert 0.35 < wrong < 0.65
    assert all(tasks.is_correct(r["task"], r["input"], r["completion"]) == r["demo_correct"] for r in sft)
    prefs = [json.loads(l) for l in open(tmp_path / "prefs.jsonl")]
    assert all(tasks.is_correct(r["task"], r["input"], r["chosen"]) and
               not tasks.is_correct(r["task"], r["input"], r["rejected"]) for r in prefs)
    held = {(json.loads(l)["task"], json.loads(l)["input"]) for l in open(tmp_path / "eval_prompts.jsonl")}
    for f in ("sft.jsonl", "prefs.jsonl", "rl_prompts.jsonl", "rankings.jsonl"):
        for l in open(tmp_path / f):
            r = json.loads(l)
            assert (r["task"], r["input"]) not in held
    # every file parses in its stage's format
    F.load_examples(str(tmp_path / "sft.jsonl"), F.parse_sft)
    F.load_examples(str(tmp_path / "rankings.jsonl"), F.parse_preference)
    F.load_examples(str(tmp_path / "rl_prompts.jsonl"), F.parse_prompt)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        tasks.get_task("nope")


@pytest.mark.parametrize("args,needle", [
    (["nope"], r"error: unknown task 'nope' \(built-in tasks: sort, reverse, add, upper\)"),
    ([","], r"error: no task named"),
    (["sort", "--wrong_share", "1.5"], r"error: wrong_share: must be in \[0, 1\], got 1.5"),
    (["sort", "--n_eval", "-1"], r"error: n_eval: must be >= 0, got -1"),
    (["sort", "--n_rank", "4", "--k", "1"], r"error: k: a ranking compares at least 2 responses, got 1"),
    # (accepted before: the shares were recorded as given, not as used; an all-zero run wrote only task.json)
    (["sort", "--systematic_share", "0.8", "--near_miss_share", "0.8"],
     r"error: systematic_share \+ near_miss_share: must be <= 1 .*got 0.8 \+ 0.8"),
    (["sort", "--n_sft", "0", "--n_pref", "0", "--n_rl", "0", "--n_eval", "0"],
     r"error: nothing to write: n_sft, n_pref, n_rank, n_rl and n_eval are all 0"),
    (["sort", "--seed", "-1"], r"error: seed: must be >= 0, got -1"),
])
def test_data_make_refuses_bad_arguments_in_one_line(tmp_path, capsys, args, needle):
    """`rlhf data make` with a task or count it cannot use: exit 2, one line, nothing written."""
    from rlhf.cli import main

    rc = main(["data", "make", *args, "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(needle, err) and "Traceback" not in err, err
    assert not (tmp_path / "d").exists()


def test_join_ranks(tmp_path):
    samples = write(tmp_path, "s.jsonl", [{"id": 1, "prompt": "q", "responses": ["a", "b", "c"]},
                                          {"id": 2, "prompt": "q2", "responses": ["x", "y"]}])
    ranks = write(tmp_path, "r.jsonl", [{"id": 2, "ranks": [2, 1]}, {"id": 1, "scores": [0.1, 0.9, 0.5]}])
    n = F.join_ranks(str(samples), str(ranks), str(tmp_path / "out.jsonl"))
    groups, _ = load(tmp_path / "out.jsonl", F.parse_preference)
    assert n == 2 and len(groups[0].pairs) == 1 and len(groups[1].pairs) == 3
    bad = write(tmp_path, "bad.jsonl", [{"id": 9, "ranks": [1, 2]}])
    with pytest.raises(F.DataError, match="bad.jsonl:1: field 'id': id 9 is not in"):
        F.join_ranks(str(samples), str(bad), str(tmp_path / "o2.jsonl"))
    short = write(tmp_path, "short.jsonl", [{"id": 1, "ranks": [1, 2]}])
    with pytest.raises(F.DataError, match="short.jsonl:1: field 'ranks': expected a list of 3"):
        F.join_ranks(str(samples), str(short), str(tmp_path / "o3.jsonl"))



def test_join_ranks_refuses_ids_that_cannot_join_one_to_one(tmp_path):
    """Two sample files concatenated both count their ids from 0: joining by id would put one
    prompt's ranks on another's responses. Repeated ids, an id ranked twice, an id that is not a
    string or integer, and a string id against an integer one are named, never joined."""
    rows = [{"id": 0, "prompt": "q", "responses": ["a", "b"]}, {"id": 1, "prompt": "q1", "responses": ["c", "d"]}]
    cat = write(tmp_path, "cat.jsonl", rows + [{"id": 0, "prompt": "other", "responses": ["e", "f"]}])
    ranks = write(tmp_path, "r.jsonl", [{"id": 0, "ranks": [2, 1]}])
    with pytest.raises(F.DataError, match=r"cat\.jsonl:3: field 'id': id 0 again \(first at line 1\)"):
        F.join_ranks(str(cat), str(ranks), str(tmp_path / "o.jsonl"))
    samples = write(tmp_path, "s.jsonl", rows)
    twice = write(tmp_path, "twice.jsonl", [{"id": 0, "ranks": [2, 1]}, {"id": 0, "ranks": [1, 2]}])
    with pytest.raises(F.DataError, match=r"twice\.jsonl:2: field 'id': id 0 ranked again \(first at line 1\)"):
        F.join_ranks(str(samples), str(twice), str(tmp_path / "o.jsonl"))
    as_list = write(tmp_path, "l.jsonl", [{"id": [0], "ranks": [2, 1]}])
    with pytest.raises(F.DataError, match=r"l\.jsonl:1: field 'id': expected a string or an integer, got \[0\]"):
        F.join_ranks(str(samples), str(as_list), str(tmp_path / "o.jsonl"))
    as_str = write(tmp_path, "t.jsonl", [{"id": "1", "ranks": [2, 1]}])
    with pytest.raises(F.DataError, match=r"id '1' is not in .*s\.jsonl \(but 1 is: the id's type differs\)"):
        F.join_ranks(str(samples), str(as_str), str(tmp_path / "o.jsonl"))
    both = write(tmp_path, "b.jsonl", [{"id": 0, "ranks": [2, 1], "scores": [0.1, 0.9]}])
    with pytest.raises(F.DataError, match=r"b\.jsonl:1: field 'scores': give exactly one of 'ranks' and 'scores'"):
        F.join_ranks(str(samples), str(both), str(tmp_path / "o.jsonl"))
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(F.DataError, match=r"e\.jsonl: no rank rows"):
        F.join_ranks(str(samples), str(tmp_path / "e.jsonl"), str(tmp_path / "o.jsonl"))
    assert not (tmp_path / "o.jsonl").exists()


def test_ultrafeedback_style_full_conversations_with_prompt_field(tmp_path):
    u = {"role": "user", "content": "hi"}
    p = write(tmp_path, "uf.jsonl", [{"prompt": "hi", "chosen": [u, {"role": "assistant", "content": "hello"}],
                                       "rejected": [u, {"role": "assistant", "content": "bye"}]}])
    (g,), _ = load(p, F.parse_preference)
    assert g.prompt == [u] and g.responses == [[{"role": "assistant", "content": "hello"}],
                                               [{"role": "assistant", "content": "bye"}]]
