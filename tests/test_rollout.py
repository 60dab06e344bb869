"""Generation and log-probs: padding invariance, EOS handling, temperature consistency."""

import contextlib

import pytest
import torch
from conftest import WeightCasts

import rlhf.rollout
from rlhf.rollout import (FewRowsLinear, cpu_exponentials, eos_mask, few_rows_linear, few_rows_pays_here, filter_logits,
                          generate, left_pad, position_ids_from_mask, response_logprobs, sample_tokens)


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 1], [0, 1, 2]]


def test_eos_mask():
    r = torch.tensor([[4, 2, 9, 9], [4, 4, 4, 4], [2, 9, 9, 9]])
    mask, has = eos_mask(r, eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and has.tolist() == [True, False, True]


def test_filter_logits_identity_and_topk_topp():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits), logits)
    k = filter_logits(logits, top_k=2)
    assert torch.isinf(k[0, [0, 3]]).all() and not torch.isinf(k[0, [1, 2]]).any()
    p = filter_logits(logits, top_p=0.5)  # top token alone has prob ~0.66
    assert not torch.isinf(p[0, 1]) and torch.isinf(p[0, [0, 2, 3]]).all()


def test_logprobs_do_not_depend_on_padding(tiny_lm):
    torch.manual_seed(0)
    short, long_ = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    response = [[20, 21], [22, 23]]
    ids, mask = left_pad([short + response[0], long_ + response[1]], 0)
    lp_batch = response_logprobs(tiny_lm, ids, mask, 2)
    ids1, mask1 = left_pad([short + response[0]], 0)
    lp_alone = response_logprobs(tiny_lm, ids1, mask1, 2)
    assert torch.allclose(lp_batch[0], lp_alone[0], atol=1e-5)


def test_generation_stops_at_eos_and_pads(tiny_lm, tok):
    g = generate(tiny_lm, [[5, 6, 7], [8, 9]], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    for row, m, has in zip(g.response_ids, g.response_mask, g.has_eos):
        n = int(m.sum())
        if has:
            assert row[n - 1] == tok.eos_token_id
        assert (row[n:] == tok.pad_token_id).all()


def test_greedy_generation_matches_transformers_generate(tiny_lm, tok):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    g = generate(tiny_lm, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 max_new_tokens=6, greedy=True)
    for i, p in enumerate(prompts):
        out = tiny_lm.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)
        ref = out[0, len(p):].tolist()
        mine = g.response_ids[i][g.response_mask[i].bool()].tolist()
        assert mine == ref[: len(mine)]


class PeakedLM(torch.nn.Module):
    """A stand-in LM whose next-token logits are fixed and sharply peaked (so the temperature
    matters a lot): logits[t] = 6 * one_hot((input_t * 3) % V) + a ramp."""

    V = 11

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def logits_of(self, input_ids):
        peak = torch.nn.functional.one_hot((input_ids * 3) % self.V, self.V).float() * 6.0
        return peak + torch.linspace(0, 1, self.V)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False,
                past_key_values=None):
        from types import SimpleNamespace

        logits = self.logits_of(input_ids)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=None)


@pytest.mark.parametrize("T", [0.5, 0.7, 2.0])
def test_scored_logprobs_are_log_softmax_of_logits_over_temperature(T):
    """Exact: response_logprobs = log_softmax(logits / T) at the sampled tokens. (Fails by > 0.5
    per token with the / T removed: the logits are peaked.)"""
    model = PeakedLM()
    ids = torch.tensor([[1, 4, 2, 7, 3], [5, 5, 9, 0, 6]])
    lp = response_logprobs(model, ids, torch.ones_like(ids), 3, temperature=T)
    want = torch.log_softmax(model.logits_of(ids)[:, -4:-1] / T, -1).gather(-1, ids[:, -3:, None])[..., 0]
    assert torch.allclose(lp, want, atol=1e-6, rtol=0)
    untempered = torch.log_softmax(model.logits_of(ids)[:, -4:-1], -1).gather(-1, ids[:, -3:, None])[..., 0]
    assert (lp - untempered).abs().max() > 0.5  # the check above can tell a missing temperature


@pytest.mark.parametrize("T", [0.5, 2.0])
def test_sampling_draws_from_softmax_of_logits_over_temperature(T):
    """Exact: generate() draws each token with torch.multinomial(softmax(logits / T)) from the
    given generator, so replaying the same draws by hand gives the same tokens."""
    model = PeakedLM()
    prompt = [3, 1]
    g = generate(model, [prompt] * 64, eos_token_id=-1, pad_token_id=0, max_new_tokens=3, temperature=T,
                 generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    last = torch.tensor([prompt[-1]] * 64)
    for t in range(3):
        probs = torch.softmax(model.logits_of(last[:, None])[:, -1] / T, -1)
        last = torch.multinomial(probs, 1, generator=gen)[:, 0]
        assert torch.equal(g.response_ids[:, t], last), t


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_sampling_logprobs_equal_recomputed_ones(tiny_lm, tok, T):
    """old_logprobs: sampling. The log-probs kept while sampling (KV cache, one token at a time)
    are response_logprobs over the finished, left-padded sequences to float rounding, and 0 after
    EOS; with a wrong temperature or an off-by-one position they differ by far more."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
    g = generate(tiny_lm, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                 max_new_tokens=10, temperature=T, generator=torch.Generator().manual_seed(3), return_logprobs=True)
    assert g.logprobs.shape == g.response_ids.shape
    ids, mask = torch.cat([g.prompt_ids, g.response_ids], 1), torch.cat([g.prompt_mask, g.response_mask], 1)
    want = response_logprobs(tiny_lm, ids, mask, g.response_ids.shape[1], temperature=T)
    m = g.response_mask.bool()
    assert torch.allclose(g.logprobs[m], want[m], atol=1e-5, rtol=0)
    assert (g.logprobs[~m] == 0).all() and (~m).any()  # some rows ended early
    shifted = response_logprobs(tiny_lm, ids[:, :-1], mask[:, :-1], g.response_ids.shape[1] - 1, temperature=T)
    assert (g.logprobs[:, 1:][m[:, 1:]] - shifted[m[:, 1:]]).abs().max() > 1e-2
    assert generate(tiny_lm, prompts, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                    max_new_tokens=4).logprobs is None


def test_entropy_returned(tiny_lm):
    ids = torch.tensor([[5, 6, 7, 8]])
    lp, ent = response_logprobs(tiny_lm, ids, torch.ones_like(ids), 2, return_entropy=True)
    assert lp.shape == ent.shape == (1, 2) and (ent > 0).all()


def test_trimmed_micro_batches_keep_every_value(tiny_lm):
    """Cutting the padding columns all rows of a micro-batch share (rollout.trim_columns) changes
    no log-prob or value at a real response position beyond float rounding, for any subset of
    rows; the full-width batch is the reference."""
    from rlhf.rollout import row_extents, trim_columns
    from rlhf.value import ValueModel, response_values

    torch.manual_seed(0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]]
    responses = [[20, 21, 22, 23, 24], [25, 26], [27, 28, 29], [30]]
    P, R = max(map(len, prompts)), max(map(len, responses))
    ids = torch.zeros(4, P + R, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P], mask[i, P - len(p):P] = torch.tensor(p), 1
        ids[i, P:P + len(r)], mask[i, P:P + len(r)] = torch.tensor(r), 1
    starts, lengths = row_extents(mask[:, :P], mask[:, P:])
    assert starts == [0, 4, 3, 5] and lengths == [5, 2, 3, 1]
    head = torch.nn.Linear(tiny_lm.config.hidden_size, 1)
    value = ValueModel(tiny_lm.model, head).eval()
    with torch.no_grad():
        full_lp = response_logprobs(tiny_lm, ids, mask, R, temperature=0.7)
        full_v = response_values(value, ids, mask, R)
        for rows in ([1, 3], [2, 1], [3], [0, 3], [0, 1, 2, 3]):
            cols, r = trim_columns(starts, lengths, rows, P)
            assert r == max(lengths[i] for i in rows) and cols.start == min(starts[i] for i in rows)
            lp = response_logprobs(tiny_lm, ids[rows][:, cols], mask[rows][:, cols], r, temperature=0.7)
            v = response_values(value, ids[rows][:, cols], mask[rows][:, cols], r)
            for k, i in enumerate(rows):
                n = lengths[i]
                torch.testing.assert_close(lp[k, :n], full_lp[i, :n], rtol=0, atol=1e-5)
                torch.testing.assert_close(v[k, :n], full_v[i, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_is_linear(bias, monkeypatch):
    """(W xᵀ)ᵀ + b equals x Wᵀ + b to float rounding, in the input's leading shape; inside
    FewRowsLinear an nn.Linear of 2..max_rows rows takes that path, one row or more rows do not."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(17, 1, 24)
    assert torch.allclose(few_rows_linear(x, lin.weight, lin.bias), lin(x), atol=1e-6, rtol=0)
    calls = []
    monkeypatch.setattr(rlhf.rollout, "few_rows_linear", lambda *a: calls.append(a[0].shape) or few_rows_linear(*a))
    with torch.no_grad(), FewRowsLinear(max_rows=16):
        ys = [lin(x[:rows]) for rows in (1, 2, 16, 17)]
    assert calls == [(2, 1, 24), (16, 1, 24)]
    for y, rows in zip(ys, (1, 2, 16, 17)):
        assert y.shape == (rows, 1, 40) and torch.allclose(y, lin(x[:rows]), atol=1e-6, rtol=0)
    # under a CPU autocast (mixed_precision: bf16) the product runs in bf16: F.linear's own path
    with torch.no_grad(), FewRowsLinear(max_rows=16), torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x[:16])
    assert calls == [(2, 1, 24), (16, 1, 24)] and y.dtype == torch.bfloat16


def test_decoding_steps_use_few_rows_linear_where_it_pays(tiny_lm, tok, monkeypatch):
    """Where few_rows_pays_here, generate() runs its decoding steps through few_rows_linear (the
    prefill does not), and the tokens and log-probs are those of plain F.linear, which runs elsewhere."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]] * 4
    kw = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_new_tokens=8, return_logprobs=True)
    calls = []
    monkeypatch.setattr(rlhf.rollout, "few_rows_linear", lambda *a: calls.append(a[0].shape[:-1]) or few_rows_linear(*a))
    monkeypatch.setattr(rlhf.rollout, "few_rows_pays_here", lambda model: True)
    fast = generate(tiny_lm, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert calls and set(calls) == {(12, 1)}
    calls.clear()
    monkeypatch.setattr(rlhf.rollout, "few_rows_pays_here", lambda model: False)
    plain = generate(tiny_lm, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert not calls
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.allclose(fast.logprobs, plain.logprobs, atol=1e-5, rtol=0)


def test_few_rows_pays_on_amd_cpus_with_avx512_and_plain_linear_layers():
    """The transposed product is for CPUs where MKL runs below its peak (AMD with AVX-512), and only
    for models with a plain nn.Linear left (oneDNN's layers are not F.linear)."""
    from rlhf.cpu_linear import use_onednn_linear

    amd = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512bw\n"
    intel = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512bw amx_tile\n"
    amd_avx2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2\n"
    model = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.ReLU())
    assert few_rows_pays_here(model, amd)
    assert not few_rows_pays_here(model, intel) and not few_rows_pays_here(model, amd_avx2)
    if use_onednn_linear(model):
        assert not few_rows_pays_here(model, amd)


def test_cpu_exponentials_are_torchs_bit_for_bit():
    """The Exp(1) draws behind sample_tokens are exponential_'s floats, and leave the generator where
    exponential_ leaves it (SmolLM2's vocabulary, 16 rows, a few seeds)."""
    for seed in range(3):
        g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        ref = torch.empty(16, 49153).exponential_(generator=g1)
        got = cpu_exponentials((16, 49153), g2)
        assert got.dtype == torch.float32 and torch.equal(got, ref)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


def test_sample_tokens_are_torch_multinomials():
    """The same tokens as torch.multinomial(probs, 1) from the same generator, draw after draw:
    peaked, flat and top-k-filtered (zeros) distributions, one row and many, an explicit generator
    and the default one; float64 probabilities go to torch.multinomial itself."""
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for i in range(60):
        logits = torch.randn(1 + i % 17, 50 + 37 * i) * (0.1 + i % 6)
        if i % 3 == 0:
            logits = filter_logits(logits, top_k=5)
        probs = logits.softmax(-1)
        assert torch.equal(sample_tokens(probs, g2), torch.multinomial(probs, 1, generator=g1).squeeze(-1))
    probs = torch.randn(8, 300).softmax(-1)
    torch.manual_seed(5)
    ref = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(5)
    assert torch.equal(sample_tokens(probs), ref)
    p64 = probs.double()
    g1.manual_seed(1), g2.manual_seed(1)
    assert torch.equal(sample_tokens(p64, g2), torch.multinomial(p64, 1, generator=g1).squeeze(-1))


@pytest.mark.parametrize("bad", ["negative", "nan", "inf", "zero_row"])
def test_sample_tokens_refuses_what_multinomial_refuses(bad):
    probs = torch.full((2, 4), 0.25)
    probs[1] = {"negative": -1.0, "nan": float("nan"), "inf": float("inf"), "zero_row": 0.0}[bad]
    with pytest.raises(RuntimeError) as ours:
        sample_tokens(probs)
    with pytest.raises(RuntimeError) as torchs:
        torch.multinomial(probs, 1)
    assert str(ours.value) in str(torchs.value)


def test_generation_in_one_autocast_region_casts_each_weight_once(tiny_lm, tok):
    """Under mixed precision accelerate wraps the model's forward in an autocast, which casts every
    fp32 weight to bf16 on each call: once per token in decoding. PPOModels.autocast (the
    run's own autocast) entered around the whole generation keeps one cast of each weight (autocast
    caches them until its outermost region exits): the same tokens and log-probs, far fewer casts."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # (a stage run in-process before this test, in the same worker, set it up)
    acc = Accelerator(mixed_precision="bf16", cpu=True)
    model = acc.prepare_model(tiny_lm)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    kw = dict(eos_token_id=-1, pad_token_id=tok.pad_token_id, max_new_tokens=6, return_logprobs=True)
    weights = [p for p in model.parameters() if p.dim() == 2]
    out = {}
    for name, region in (("per token", contextlib.nullcontext), ("one region", acc.autocast)):
        with torch.no_grad(), region(), WeightCasts(weights) as casts:
            out[name] = generate(model, prompts, generator=torch.Generator().manual_seed(0), **kw)
        out[name + " casts"] = casts.n
    assert torch.equal(out["per token"].response_ids, out["one region"].response_ids)
    assert torch.equal(out["per token"].logprobs, out["one region"].logprobs)
    assert out["per token casts"] >= 6 * len(weights) and out["one region casts"] <= len(weights)


def test_the_rm_reads_the_eos_it_was_trained_on_even_when_a_response_was_cut(tok):
    """A reward model is trained on prompt + reply + EOS. PPO hands it the sampled ids when it
    shares the policy's tokenizer: a reply cut at max_new_tokens gets the EOS appended (as the
    text path re-encodes it), one that ended with EOS is left as it is."""
    import copy

    from rlhf.data.formats import PromptExample
    from rlhf.rewards import RewardModel
    from rlhf.rollout import Generation
    from rlhf.stages.ppo import Rollout, sequence_scores

    eos, pad = tok.eos_token_id, tok.pad_token_id

    class SpyRM(RewardModel):
        def __init__(self):  # (no checkpoint: the RM's tokenizer is the policy's)
            self.tok, self.seqs = tok, None

        def score_ids(self, seqs, normalized=True, batch_size=64):
            self.seqs = seqs
            return torch.zeros(len(seqs))

    gen = Generation(prompt_ids=torch.tensor([[pad, 5], [6, 7]]), prompt_mask=torch.tensor([[0, 1], [1, 1]]),
                     response_ids=torch.tensor([[8, eos, pad], [9, 10, 11]]),
                     response_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]), has_eos=torch.tensor([True, False]))
    prompts = [PromptExample([{"role": "user", "content": "q"}], {}, "q") for _ in range(2)]
    rm = SpyRM()
    sequence_scores(Rollout(gen, prompts, ["a", "b"]), tok, rm, [], 1.0, 0.0, "cpu")
    assert rm.seqs == [[5, 8, eos], [6, 7, 9, 10, 11, eos]]
    other = copy.deepcopy(tok)
    other.eos_token = "<|user|>"  # the same vocabulary and template, another EOS: not the same tokenizer
    assert rm.same_tokenizer(copy.deepcopy(tok)) and not rm.same_tokenizer(other)


def test_a_reward_model_cuts_sequences_past_its_positions_and_ppo_counts_them(tok, tmp_path, caplog):
    """A reward model with a tokenizer of its own re-encodes PPO's text; with a learned position
    table (GPT-2, BERT) a long response ran past it: an IndexError mid-run. It is scored on its
    first limit - 1 tokens and its last (the EOS the score is read at), warned once, and PPO logs
    the share cut as `rm_truncated`."""
    import copy

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhf.data.formats import PromptExample
    from rlhf.errors import RewardError
    from rlhf.rewards import RewardModel, fit_positions
    from rlhf.rollout import Generation
    from rlhf.stages.ppo import Rollout, sequence_scores

    assert fit_positions([[1, 2, 3, 4, 5, 6], [7, 8, 9], [1, 2, 3, 4]], 4) == \
        ([[1, 2, 3, 6], [7, 8, 9], [1, 2, 3, 4]], [True, False, False])
    assert fit_positions([[1, 2, 3]], None) == ([[1, 2, 3]], [False])
    assert fit_positions([[1, 2, 3]], 1) == ([[1, 2, 3]], [False])  # (no room for both ends: refused when scored)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=20, num_labels=1,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    other = copy.deepcopy(tok)
    other.chat_template += "{# the RM's own template #}"  # renders the same, but not the policy's tokenizer
    model.save_pretrained(tmp_path)
    other.save_pretrained(tmp_path)
    rm = RewardModel(str(tmp_path))
    assert rm.positions == 20 and not rm.same_tokenizer(tok)
    seq = rm.encode([{"role": "user", "content": "sort 3 1 2"}], "1 2 3 and then some more words here")
    assert len(seq) > 20
    with caplog.at_level("WARNING"):
        fitted, cut = rm.fit([seq, seq[:5]])
        rm.fit([seq])
    assert cut == [True, False] and fitted == [seq[:19] + seq[-1:], seq[:5]]
    assert sum("longer than its 20 learned positions" in r.message for r in caplog.records) == 1  # (warned once)
    prompt = [{"role": "user", "content": "sort 3 1 2"}]
    assert torch.allclose(rm.score([prompt], ["1 2 3 and then some more words here"], fit=True),
                          rm.score_ids(fitted[:1]))
    # rm_refresh trains the RM on what it scores: cut the same way (group_loss ran past the table)
    from types import SimpleNamespace

    from rlhf.rewards import group_loss
    from rlhf.rm_refresh import RMRefresher

    group = SimpleNamespace(prompt=prompt, responses=["1 2 3 and then some more words here", "3 2 1"],
                            pairs=[(0, 1, 0.0)])
    seqs, pairs = RMRefresher.encode(SimpleNamespace(rm=rm), group)
    assert [len(x) for x in seqs] == [20, len(rm.encode(prompt, "3 2 1"))]
    assert torch.isfinite(group_loss(rm.model, [(seqs, pairs)], tok.pad_token_id, "cpu")[0]).all()
    # not asked to cut (`rlhf score`, a refresh's reference set): one line, not an IndexError from the table
    with pytest.raises(RewardError, match=r"a sequence to score of \d+ tokens with the prompt, more than the reward "
                                          r"model's 20 learned positions"):
        rm.score_ids([seq])
    # PPO's text path: the share cut is logged with the RM's score
    gen = Generation(prompt_ids=torch.tensor([[5], [6]]), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                     response_ids=torch.tensor([[8], [9]]), response_mask=torch.ones(2, 1, dtype=torch.long),
                     has_eos=torch.tensor([True, True]))
    prompts = [PromptExample([{"role": "user", "content": "sort 3 1 2"}], {}, "q") for _ in range(2)]
    texts = ["1 2 3 and then some more words here", "1 2 3"]
    score, parts = sequence_scores(Rollout(gen, prompts, texts), tok, rm, [], 1.0, 0.0, "cpu")
    assert parts["rm_truncated"].tolist() == [1.0, 0.0] and torch.isfinite(score).all()

    class SpyRM(RewardModel):  # (a stand-in without __init__: no table, nothing cut, nothing counted)
        def __init__(self):
            self.tok = other

        def score_ids(self, seqs, normalized=True, batch_size=64):
            return torch.zeros(len(seqs))

    assert list(sequence_scores(Rollout(gen, prompts, texts), tok, SpyRM(), [], 1.0, 0.0, "cpu")[1]) == ["rm_score"]
