"""Evaluation metrics on hand-made inputs, `rlhf eval`, and the run report."""

import json
import math

import pytest
import torch

from conftest import run_cli
from rlhf.evaluate import bleu_chrf, format_table, perplexity, win_rate


def test_win_rate_with_ties_and_ci():
    a = [1.0, 1.0, 0.0, 0.5, 0.2]
    b = [0.0, 1.0, 1.0, 0.5, 0.1]
    w = win_rate(a, b, n_boot=500, seed=1)
    assert (w["wins"], w["ties"], w["losses"], w["n"]) == (2, 2, 1, 5)
    assert w["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert 0.0 <= w["ci95_low"] <= w["win_rate"] <= w["ci95_high"] <= 1.0
    assert win_rate([1.0] * 20, [0.0] * 20)["ci95_low"] == 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_bleu_chrf_match_sacrebleu():
    import sacrebleu

    hyps = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat sat on a mat", "the quick brown fox"]
    got = bleu_chrf(hyps, refs)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert bleu_chrf(refs, refs)["bleu"] == pytest.approx(100.0)


def test_perplexity_is_exp_mean_loss(tiny_lm, tok):
    from rlhf.data.formats import SFTExample
    from rlhf.evaluate import lm_perplexity
    from rlhf.tokenization import encode_sft

    ex = [SFTExample([{"role": "user", "content": "Sort the digits: 21"}], [{"role": "assistant", "content": "12"}])]
    res = lm_perplexity(tiny_lm, tok, ex)
    ids, labels = encode_sft(tok, ex[0].prompt, ex[0].completion)
    out = tiny_lm(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
    assert res["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(out.loss.item()), rel=1e-5)
    assert perplexity(0.0, 10) == 1.0


@pytest.mark.slow
def test_rlhf_eval_end_to_end(tmp_path, sft_checkpoint, task_dir):
    judge = tmp_path / "judge.py"
    judge.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    out = tmp_path / "eval.json"
    p = run_cli("eval", sft_checkpoint, sft_checkpoint, "--perplexity", task_dir / "sft.jsonl", "--prompts",
                task_dir / "eval_prompts.jsonl", "--reward_fn", "gold", "--judge", f"{judge}:length",
                "--reference_field", "answer", "--max_samples", "16", "--max_new_tokens", "8", "--out", out)
    res = json.loads(out.read_text())
    r = res["checkpoints"][str(sft_checkpoint)]
    for k in ("perplexity", "gold_accuracy", "reward/gold", "bleu", "chrf", "eos_rate"):
        assert k in r, k
    assert r["gold_accuracy"] == r["reward/gold"]
    (w,) = res["win_rate"].values()
    assert w["win_rate"] == 0.5 and w["ties"] == 16  # the same checkpoint and seed: every pair ties
    assert res["generation"]["max_new_tokens"] == 8 and "win rate" in p.stdout and "perplexity" in p.stdout


@pytest.mark.slow
def test_rlhf_eval_reads_a_plain_text_prompt_file_as_rlhf_generate_does(tmp_path, sft_checkpoint):
    """`rlhf eval --prompts prompts.txt` (one prompt a line, blank lines skipped) samples what the same
    prompts as chat-message rows give; it was refused ("unsupported file type") where `rlhf generate`
    took the file."""
    judge = tmp_path / "judge.py"
    judge.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in completions]\n")
    texts = [f"Sort the digits: {n}" for n in ("04876", "59382", "19489", "7310")]
    (tmp_path / "p.txt").write_text("\n".join(texts[:2]) + "\n\n  \n" + "\n".join(texts[2:]) + "\n")
    rows = [{"prompt": [{"role": "user", "content": t}]} for t in texts[:3]]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = {}
    for name in ("p.txt", "p.jsonl"):
        run_cli("eval", sft_checkpoint, "--prompts", tmp_path / name, "--reward_fn", f"{judge}:length", "--max_samples",
                "3", "--max_new_tokens", "8", "--out", tmp_path / f"{name}.json")
        res[name] = json.loads((tmp_path / f"{name}.json").read_text())["checkpoints"][str(sft_checkpoint)]
    assert res["p.txt"] == res["p.jsonl"] and res["p.txt"]["response_chars"] > 0, res
    assert [k for k in res["p.txt"] if k.startswith("reward/")] == [f"reward/{judge}:length"]


def test_format_table():
    t = format_table({"checkpoints": {"a": {"x": 1.0}, "b": {"x": 2.5}}, "generation": {"temperature": 1.0}})
    assert "2.5000" in t and "temperature=1.0" in t


def test_report_has_nonempty_plots_for_each_stage(tmp_path):
    from rlhf.report import PANELS, build_report

    for stage, panels in PANELS.items():
        run = tmp_path / stage
        run.mkdir()
        keys = {k for _, ks in panels for k in ks}
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(1, 6):
                f.write(json.dumps({"step": step, **{k: step * 0.1 for k in keys}}) + "\n")
        (run / "summary.json").write_text(json.dumps({"stage": stage, "eval_x": 1.0}))
        if stage == "ppo":
            (run / "samples.jsonl").write_text(json.dumps({"step": 1, "prompt": "p", "completion": "<c>", "score": 1.0}) + "\n")
        page = build_report(run)
        pngs = sorted((run / "report").glob("*.png"))
        extra = 1 if stage == "ppo" else 0  # PPO's Gao et al. plot: proxy and gold against sqrt(KL)
        assert len(pngs) == len(panels) + extra
        assert (run / "report" / "gao_proxy_vs_gold.png").exists() == (stage == "ppo")
        from PIL import Image

        for png in pngs:
            img = Image.open(png).convert("L")
            lo, hi = img.getextrema()
            assert img.size[0] > 300 and hi - lo > 100  # a real drawing, not a blank image
        text = open(page).read()
        assert text.count("data:image/png;base64,") == len(panels) + extra
        if stage == "ppo":
            assert "&lt;c&gt;" in text  # samples are shown, HTML-escaped


def test_wandb_logging_when_a_recipe_turns_it_on(tmp_path, monkeypatch):
    """MetricsLogger hands every record to wandb (a stand-in module here: no network, no account)."""
    import sys
    import types

    calls = {"log": [], "init": None, "finished": False}

    class Run:
        def log(self, rec, step):
            calls["log"].append((step, rec))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.__setitem__("init", kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    from rlhf.engine import MetricsLogger

    lg = MetricsLogger(tmp_path, tensorboard=False, wandb_project="proj", config={"lr": 1.0})
    lg.log(3, {"loss": 0.5})
    lg.close()
    import os

    assert calls["init"]["project"] == "proj" and calls["init"]["config"] == {"lr": 1.0}
    assert os.environ["WANDB_MODE"] == "offline"
    assert calls["log"][0][0] == 3 and calls["log"][0][1]["loss"] == 0.5 and calls["finished"]


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from rlhf.engine import MetricsLogger, RunError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(RunError, match="pip install wandb"):
        MetricsLogger(tmp_path, wandb_project="p")


def test_report_reads_a_run_killed_while_writing_a_metrics_line(tmp_path):
    """`rlhf report` on a run killed (or still running) mid-line: the cut last line is left out,
    as --resume drops it; a damaged line before the last is still an error."""
    from rlhf.report import _read_jsonl

    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2)]
    (tmp_path / "m.jsonl").write_text("\n".join(good) + '\n{"step": 3, "lo')
    assert [r["step"] for r in _read_jsonl(tmp_path / "m.jsonl")] == [1, 2]
    (tmp_path / "bad.jsonl").write_text(good[0] + '\n{"step": 2, "lo\n' + good[1] + "\n")
    from rlhf.errors import RunError  # (one line from the CLI, exit 2)

    with pytest.raises(RunError, match=r"bad\.jsonl:2: not a JSON record"):
        _read_jsonl(tmp_path / "bad.jsonl")


def test_gold_examples_takes_at_most_its_limit():
    """gen_eval_samples: 0 turns the gold evaluation off (it took one example: the limit was
    checked after the first was kept, and the positions check then refused a run told to set 0)."""
    from types import SimpleNamespace

    from rlhf.evaluate import gold_examples

    rows = [SimpleNamespace(meta={"task": "sort", "input": x}) for x in ("31", "12", "31", "45")]
    assert gold_examples(rows, 0) == []
    assert [r.meta["input"] for r in gold_examples(rows, 2)] == ["31", "12"]
    assert [r.meta["input"] for r in gold_examples(rows, 9)] == ["31", "12", "45"]  # unique prompts
