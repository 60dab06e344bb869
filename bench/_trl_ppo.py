"""Worker: TRL 1.12.0's trl.experimental.ppo.PPOTrainer on the bench's models (run in the TRL venv).

Prints one JSON line: seconds of each PPO iteration (update), peak RSS, and the median seconds of
each phase (generate; experience: reference, value and reward forwards; train), read off clocks
set around TRL's own module-level `batch_generation` and `forward`. Called by ppo_vs_trl.py.
"""

import argparse
import json
import resource
import tempfile
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--minibatch", type=int, required=True)
    ap.add_argument("--micro", type=int, required=True)
    ap.add_argument("--epochs", type=int, required=True)
    ap.add_argument("--response", type=int, required=True)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--kl_coef", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--onednn", action="store_true",
                    help="run the four models' linear layers through oneDNN as rlhf's onednn_linear does")
    ap.add_argument("--bf16", action="store_true",
                    help="bf16=True (accelerate's autocast over fp32 weights), and each rollout call under the same "
                         "autocast (see --trl_bf16_own); the peaks are then bf16 matmuls")
    ap.add_argument("--matmul_precision", default="highest", choices=["highest", "high", "medium"],
                    help="torch.set_float32_matmul_precision for the whole run (medium: bf16 inputs, fp32 accumulation "
                         "in the fp32 products on CPUs with AMX), as rlhf's matmul_precision key sets it")
    ap.add_argument("--trl_ga_spans_minibatches", action="store_true",
                    help="the bench's configuration before 2026-12-06: per_device_train_batch_size = micro and "
                         "gradient accumulation over batch / micro micro-batches, so that TRL steps its optimizer "
                         "once per epoch, not once per minibatch (fewer optimizer steps than the recipe's)")
    ap.add_argument("--trl_bf16_own", action="store_true",
                    help="with --bf16: TRL's own bf16=True alone (an autocast over its training forward only; "
                         "its rollout in fp32)")
    a = ap.parse_args()

    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.flops import measure_matmul_peak  # (the venv sees this Python's packages, rlhf included)

    assert trl.__version__ == "1.12.0", trl.__version__
    torch.set_float32_matmul_precision(a.matmul_precision)  # before the peak: it is the peak of these products
    if a.matmul_precision == "medium":  # TRL gets rlhf's attention choice too (rlhf.engine.set_matmul_precision):
        torch.backends.cuda.enable_flash_sdp(False)  # CPU flash attention is 5-15x slower under bf16 fpmath
    peak_dtype = torch.bfloat16 if a.bf16 else torch.float32
    peak_start = measure_matmul_peak(2048, 10, peak_dtype) / 1e12  # the machine's speed around this run, as ours reports it
    torch.manual_seed(a.seed)
    tok = AutoTokenizer.from_pretrained(a.policy)
    tok.padding_side = "left"
    rows = [json.loads(l) for l in open(a.prompts)][: a.batch * a.iters + a.batch]
    ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False) for r in rows]
    ids = [x["input_ids"] if isinstance(x, dict) else list(x) for x in ids]
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(a.policy)
    ref = AutoModelForCausalLM.from_pretrained(a.policy)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1)
    if a.onednn:  # the same kernels as ours with onednn_linear: true, for a side-by-side at equal kernels
        from rlhf.cpu_linear import use_onednn_linear

        for m in (policy, ref, reward, value):
            use_onednn_linear(m)
    # TRL's rollout batch is per_device_train_batch_size x gradient_accumulation_steps, its micro-batches are
    # per_device_train_batch_size rows of a minibatch, and accelerate counts the accumulation across
    # minibatches. One optimizer step per minibatch, as the recipe asks, is therefore per_device = batch with
    # no accumulation (each micro-batch is then a whole minibatch, which needs micro == minibatch); any other
    # split makes TRL step once every batch / micro micro-batches, spanning minibatches.
    per_device, ga = a.micro, a.minibatch // a.micro * (a.batch // a.minibatch)
    if a.micro == a.minibatch and not a.trl_ga_spans_minibatches:
        per_device, ga = a.batch, 1
    args = PPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=per_device, gradient_accumulation_steps=ga,
        num_mini_batches=a.batch // a.minibatch, num_ppo_epochs=a.epochs, total_episodes=a.batch * a.iters,
        local_rollout_forward_batch_size=a.batch, response_length=a.response, stop_token="eos",
        missing_eos_penalty=-1.0, temperature=1.0, kl_coef=a.kl_coef, learning_rate=a.lr,
        num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=10**6, bf16=a.bf16, fp16=False,
        use_cpu=True, gradient_checkpointing=False, seed=a.seed, dataloader_num_workers=0)
    times, marks = [], []  # marks: per iteration [generation start, generation end, first training forward]
    import trl.experimental.ppo.ppo_trainer as ppo_mod

    if a.bf16 and not a.trl_bf16_own:
        # TRL's own bf16=True autocasts only the prepared policy+value wrapper's training forward: its
        # generation and its rollout's reference, value and reward forwards would stay fp32, work ours
        # does in bf16. Each of those calls runs here under the same CPU autocast, one region per call
        # (so its weights are cast once per call, as ours are once per generation). Not one region
        # around train(): autocast's cache would then serve the weights' bf16 copies from before
        # every optimizer step.
        def in_bf16(f, skip=lambda *args: False):
            def g(*args, **kw):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not skip(*args)):
                    return f(*args, **kw)
            return g

        ppo_mod.batch_generation, ppo_mod.get_reward = in_bf16(ppo_mod.batch_generation), in_bf16(ppo_mod.get_reward)
        ppo_mod.forward = in_bf16(ppo_mod.forward, lambda model, *args: hasattr(model, "value_model"))
    generate, forward = ppo_mod.batch_generation, ppo_mod.forward

    def timed_generation(*args, **kw):
        marks.append([time.perf_counter()])
        out = generate(*args, **kw)
        marks[-1].append(time.perf_counter())
        return out

    def timed_forward(model, *args, **kw):
        if hasattr(model, "value_model") and marks and len(marks[-1]) == 2:  # the policy+value wrapper: training
            marks[-1].append(time.perf_counter())
        return forward(model, *args, **kw)

    ppo_mod.batch_generation, ppo_mod.forward = timed_generation, timed_forward

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    steps: dict[int, int] = {}  # optimizer steps actually taken, per optimizer (torch's global step hook)
    register_optimizer_step_post_hook(
        lambda opt, args, kwargs: steps.__setitem__(id(opt), steps.get(id(opt), 0) + 1))
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(a.batch)),
                         callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    peak_end = measure_matmul_peak(2048, 10, peak_dtype) / 1e12
    stamps = [t0] + times
    rows = [(m[1] - m[0], m[2] - m[1], end - m[2]) for m, end in zip(marks, times) if len(m) == 3]
    phases = {k: sorted(r[i] for r in rows)[len(rows) // 2]
              for i, k in enumerate(("time_generate", "time_experience", "time_train"))} if rows else {}
    print(json.dumps({"impl": "trl-1.12.0", "bf16": a.bf16, "onednn_linear": a.onednn, "phases": phases,
                      "optimizer_steps_per_iteration": max(steps.values(), default=0) / a.iters,
                      "peak_tflops_start": peak_start, "peak_tflops_end": peak_end,
                      "iter_seconds": [b - c for b, c in zip(stamps[1:], stamps[:-1])],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
