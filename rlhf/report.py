"""A small self-contained report of a run: PNG plots (matplotlib) and one HTML page.

``build_report(RUN_DIR)`` reads ``metrics.jsonl``, ``summary.json`` (and PPO's ``samples.jsonl``)
and writes ``RUN_DIR/report/*.png`` and ``RUN_DIR/report/index.html`` (the PNGs are embedded, so
the page can be mailed around). A pipeline folder gets a page that links its stages' reports.
Every stage calls it at the end; ``rlhf report RUN_DIR`` rebuilds it.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from .errors import RunError

PANELS = {
    "sft": [("training loss", ["loss"]), ("learning rate", ["lr"]), ("held-out loss", ["eval_loss"]),
            ("gradient norm", ["grad_norm"])],
    "dpo": [("training loss", ["loss"]), ("implicit reward accuracy", ["rewards/accuracies"]),
            ("implicit reward margin", ["rewards/margins"]), ("learning rate", ["learning_rate"]),
            ("held-out evaluation", ["eval_reward", "eval_gold_accuracy", "eval_kl"])],
    "rm": [("training loss", ["loss"]), ("training accuracy", ["accuracy"]),
           ("held-out accuracy", ["eval_accuracy"]), ("held-out margin", ["eval_margin"]), ("learning rate", ["lr"])],
    "ppo": [("score (reward before KL)", ["score", "rm_score"]), ("gold accuracy (training batches)", ["gold_accuracy"]),
            ("KL to the reference (nats / sequence)", ["kl", "kl_k3"]), ("KL coefficient β", ["kl_coef"]),
            ("entropy", ["entropy"]), ("clip fractions", ["policy_clipfrac", "value_clipfrac"]),
            ("approx. KL and ratio", ["approx_kl", "ratio_mean"]), ("response length (tokens)", ["response_length"]),
            ("losses", ["pg_loss", "vf_loss", "ptx_loss"]),
            ("time per iteration by phase (s)", ["time_generate", "time_score", "time_experience", "time_train"]),
            ("held-out evaluation", ["eval_reward", "eval_gold_accuracy", "eval_gold_reward", "eval_kl"]),
            ("gold reward (training batches)", ["gold_reward"]), ("hacking alarm", ["hacking_alarm"]),
            ("RM refresh: accuracy on the policy's samples", ["rm_refresh/accuracy_before", "rm_refresh/accuracy_after"])],
}


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics file; a last line cut short (a run killed, or still writing it) is
    left out, as `--resume` drops it."""
    from .textio import log_records

    return [record for _, record in log_records(path, RunError)] if path.exists() else []


def _plot(records: list[dict], title: str, keys: list[str], png: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
    for k, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, linewidth=1.5, label=k)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(series) > 1 or keys[0] != title:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def plot_gao(records: list[dict], png: Path) -> bool:
    """Gao et al. 2022's picture: the proxy and the gold reward of each held-out evaluation against
    sqrt(KL to the initial policy); the proxy keeps rising where the gold turns down."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in records if isinstance(r.get("eval_kl"), (int, float)) and "eval_reward" in r]
    gold_key = next((k for k in ("eval_gold_reward", "eval_gold_accuracy") if any(k in r for r in evals)), None)
    if len(evals) < 2 or gold_key is None:
        return False
    d = [max(r["eval_kl"], 0.0) ** 0.5 for r in evals]
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=100)
    ax.plot(d, [r["eval_reward"] for r in evals], marker="o", markersize=3, color="tab:blue", label="proxy (eval_reward)")
    ax.set_xlabel("sqrt(KL to the SFT policy), nats^0.5 per sequence")
    ax.set_ylabel("proxy reward", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(d, [r.get(gold_key) for r in evals], marker="s", markersize=3, color="tab:red", label=f"gold ({gold_key})")
    ax2.set_ylabel(gold_key, color="tab:red")
    for r, x in zip(evals, d):
        if r.get("step") is not None and r is evals[-1]:
            ax.annotate(f"it {r['step']}", (x, r["eval_reward"]), fontsize=7)
    ax.set_title("proxy vs gold reward (Gao et al. 2022)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return True


def _table(d: dict) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in d.items()
                   if not isinstance(v, (dict, list)))
    return f"<table>{rows}</table>"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


STYLE = ("<style>body{font-family:sans-serif;margin:2em;max-width:1100px}img{margin:4px;border:1px solid #ddd}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;"
         "text-align:left}</style>")


def final_path_of(run: Path) -> Path:
    """The path a run has once promoted (a staging folder '.NAME.staging' becomes 'NAME')."""
    from .rundir import final_path

    return final_path(Path(run))


def build_report(run_dir: str | Path) -> str:
    """Write RUN_DIR/report/index.html (+ PNGs); returns the page's path."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise RunError(f"{run}: a file, not a run folder; give the folder a run wrote (or a pipeline's)")
    if not run.is_dir():
        raise RunError(f"{run}: no such run folder")
    if not any((d / f).exists() for d in [run] + [run / s for s in ("sft", "rm", "ppo", "dpo")]
               for f in ("summary.json", "metrics.jsonl")):
        raise RunError(f"{run}: holds no run (no summary.json or metrics.jsonl, nor sft/, rm/, ppo/, dpo/ with one); "
                       f"give a run folder or a pipeline folder")
    summary_path = run / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    except ValueError as e:
        raise RunError(f"{summary_path}: damaged, cannot be read ({e}); restore it or remove it (the report is "
                       f"then built from metrics.jsonl alone)") from None
    if not isinstance(summary, dict):
        raise RunError(f"{summary_path}: damaged (a JSON {type(summary).__name__}, not a run summary)")
    if "stages" in summary or any((run / s / "metrics.jsonl").exists() for s in ("sft", "rm", "ppo", "dpo")):
        return _pipeline_report(run, summary)
    out = run / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # panels are renumbered when the set changes
        old.unlink()
    records = _read_jsonl(run / "metrics.jsonl")
    stage = summary.get("stage") or _guess_stage(records)
    imgs = []
    for i, (title, keys) in enumerate(PANELS.get(stage, [])):
        png = out / f"{i:02d}_{keys[0].replace('/', '_')}.png"
        if _plot(records, title, keys, png):
            data = base64.b64encode(png.read_bytes()).decode()
            imgs.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    if stage == "ppo" and plot_gao(records, out / "gao_proxy_vs_gold.png"):
        data = base64.b64encode((out / "gao_proxy_vs_gold.png").read_bytes()).decode()
        imgs.append(f'<img alt="proxy vs gold reward against sqrt(KL)" src="data:image/png;base64,{data}">')
    parts = [f"<html><head><meta charset='utf-8'><title>rlhf {stage} report</title>{STYLE}</head><body>",
             f"<h1>{html.escape(stage.upper())} run: {html.escape(str(final_path_of(run)))}</h1>", "<h2>Summary</h2>",
             _table(summary), "<h2>Curves</h2>", "".join(imgs) or "<p>(no metrics logged)</p>"]
    samples = _read_jsonl(run / "samples.jsonl")
    if samples:
        steps = sorted({s["step"] for s in samples})
        shown = [s for s in samples if s["step"] in (steps[0], steps[-1]) or s["step"] in steps[:: max(len(steps) // 4, 1)]]
        rows = "".join(f"<tr><td>{s['step']}</td><td>{html.escape(str(s['prompt']))}</td>"
                       f"<td>{html.escape(str(s['completion']))}</td><td>{s['score']:.3f}</td></tr>" for s in shown)
        parts += ["<h2>Sample completions over time</h2>",
                  f"<table><tr><th>step</th><th>prompt</th><th>completion</th><th>score</th></tr>{rows}</table>"]
    parts.append("</body></html>")
    page = out / "index.html"
    page.write_text("\n".join(parts))
    return str(page)


def _guess_stage(records: list[dict]) -> str:
    keys = {k for r in records for k in r}
    return "ppo" if "pg_loss" in keys else "dpo" if "rewards/margins" in keys else "rm" if "accuracy" in keys else "sft"


def _pipeline_report(run: Path, summary: dict) -> str:
    parts = [f"<html><head><meta charset='utf-8'><title>rlhf pipeline report</title>{STYLE}</head><body>",
             f"<h1>Pipeline run: {html.escape(str(final_path_of(run)))}</h1>"]
    for stage in ("sft", "rm", "ppo", "dpo"):
        if not (run / stage / "metrics.jsonl").exists():
            continue
        page = build_report(run / stage)
        rel = Path(page).relative_to(run)
        parts += [f"<h2>{stage.upper()} — <a href='{rel.as_posix()}'>full report</a></h2>",
                  _table(summary.get(stage) or {})]
    parts.append("</body></html>")
    page = run / "report.html"
    page.write_text("\n".join(parts))
    return str(page)


def report_after_run(run_dir: Path) -> None:
    """Build the report at the end of a run; the run's results are already saved, so a plotting
    problem is logged, not raised."""
    import logging

    try:
        path = build_report(run_dir)
        logging.getLogger(__name__).info("report: %s", path)
    except Exception as e:  # noqa: BLE001 - never lose a finished run to a plot
        logging.getLogger(__name__).warning("could not build the report of %s: %s", run_dir, e)
