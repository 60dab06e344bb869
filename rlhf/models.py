"""Loading policy / reference / reward / value models and tokenizers.

- Any transformers causal LM or sequence-classification model from a local folder or hub id
  (GGUF too, dequantised by transformers), or a model built from a config (``init:
  from_config``) with a byte-level BPE tokenizer trained here on the recipe's data.
- PAD is always distinct from EOS (else the EOS gets masked as padding and the model never
  learns to stop [N, N+]); a default chat template is set when the tokenizer has none.
- ``trust_remote_code`` stays off unless the recipe sets it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from .errors import ModelError
from .config import ModelConfig

log = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# One turn per role marker; an assistant turn ends with EOS so the policy learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ModelError(f"recipe: 'model.dtype' must be one of {', '.join(_DTYPES)}, got '{name}'")
    return _DTYPES[name]


# ----------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on `texts` (digits split one per token).

    Returns a `PreTrainedTokenizerFast` with distinct PAD and EOS, role tokens and the default
    chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, EOS_TOKEN, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   bos_token=None, unk_token=None,
                                   additional_special_tokens=list(ROLE_TOKENS))
    fast.chat_template = DEFAULT_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def load_tokenizer(cfg: ModelConfig, train_texts: list[str] | None = None):
    """Load (or, for from_config without a tokenizer, train) the tokenizer and make it RL-ready."""
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if cfg.init == "from_config" and not cfg.tokenizer:
        if not train_texts:
            raise ModelError("recipe: 'model.init: from_config' without 'model.tokenizer' needs training texts")
        tok = train_tokenizer(train_texts, cfg.tokenizer_vocab_size)
    else:
        if not source:
            raise ModelError("recipe: 'model.name_or_path' is not set")
        _check_local(source, "model.tokenizer" if cfg.tokenizer else "model.name_or_path")
        kwargs = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        if cfg.gguf_file and not cfg.tokenizer:
            kwargs["gguf_file"] = cfg.gguf_file
        try:
            tok = AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as e:  # (ValueError: a folder with no tokenizer files in it)
            raise ModelError(f"{source}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    return prepare_tokenizer(tok, cfg.chat_template)


def prepare_tokenizer(tok, chat_template: str | None = None):
    """Distinct PAD and EOS, a chat template, left padding (for generation)."""
    if tok.eos_token is None and getattr(tok, "sep_token", None) is not None:
        tok.eos_token = tok.sep_token  # encoders (BERT-style): [SEP] ends the sequence
    if tok.eos_token is None:
        raise ModelError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token; set one in the tokenizer")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
    if chat_template:
        tok.chat_template = chat_template
        check_chat_template(tok)
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def check_chat_template(tok) -> None:
    """A recipe's `model.chat_template` renders a user + assistant exchange (and the prompt alone,
    ready for the reply) with both messages' text in it: a Jinja error, or a file path or constant
    given for the template (every prompt would render the same), is one line before any model loads."""
    probe = [{"role": "user", "content": "Q7x"}, {"role": "assistant", "content": "A9y"}]
    try:
        text = tok.apply_chat_template(probe, tokenize=False)
        tok.apply_chat_template(probe[:1], tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateSyntaxError / UndefinedError, or the template's raise_exception
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ModelError(f"model.chat_template: does not render a conversation ({type(e).__name__}: {why})") from None
    if "Q7x" not in text or "A9y" not in text:
        raise ModelError("model.chat_template: what it renders leaves out the messages' content (a file path or a "
                         "constant is not a template: give the Jinja text itself)")


def _check_local(source: str, fld: str | None) -> None:
    p = Path(source)
    looks_local = source.startswith((".", "/", "~")) or p.exists() or source.count("/") > 1
    # 'runs/sftx' reads like a hub id ('org/name'), but when 'runs' is a folder here it is a path
    # mistyped, not something to look up on the hub (a minute of retries without a network);
    # unless the hub id is in the local hub cache
    beside = "/" in source and Path(source.split("/")[0]).is_dir() and not _in_hub_cache(source)
    if (looks_local or beside) and not p.exists():
        hint = f" (a folder '{source.split('/')[0]}' is here; for the hub id, run from another folder)" if beside \
            and not looks_local else ""
        raise ModelError((f"recipe: '{fld}' points at a missing checkpoint: {source}" if fld
                          else f"{source}: no such checkpoint folder") + hint)


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # (not an id the hub accepts: not cached)
        return False


def _named(fld: str | None, source: str, problem: str) -> str:
    """'recipe: 'FIELD' PROBLEM: SOURCE' (the CLI puts the recipe's file:line in front), or
    'SOURCE: PROBLEM' for a path given on the command line."""
    return f"recipe: '{fld}' {problem}: {source}" if fld else f"{source}: {problem.removeprefix('is ')}"


def read_model_config(source: str, fld: str | None = None) -> dict | None:
    """A local checkpoint folder's config.json (None for a hub id, read by transformers later).
    A folder without one, or a file, is not a model: one line naming the field, before loading."""
    import json

    _check_local(source, fld)
    p = Path(source)
    if not p.exists():
        return None
    if not (p / "config.json").is_file():
        raise ModelError(_named(fld, source, "is not a model folder (no config.json in it)"))
    from .textio import read_text

    try:
        return json.loads(read_text(p / "config.json", ModelError))
    except json.JSONDecodeError as e:
        raise ModelError(f"{p / 'config.json'}:{e.lineno}: invalid JSON ({e.msg})") from None


def check_reward_model(source: str, fld: str | None = None) -> None:
    """`source` is a reward model as `rlhf rm` writes one: a *ForSequenceClassification with one
    label. A policy checkpoint there would load with a fresh random head and score noise."""
    conf = read_model_config(source, fld)
    if conf is None:
        return
    arch = (conf.get("architectures") or ["(none named)"])[0]
    labels = len(conf.get("id2label") or {0: ""})
    if not arch.endswith("ForSequenceClassification") or labels != 1:
        what = f"architecture {arch}" + (f", {labels} labels" if arch.endswith("ForSequenceClassification") else "")
        raise ModelError(_named(fld, source, f"is not a reward model ({what}; a reward model is a "
                                             f"*ForSequenceClassification with one label, as `rlhf rm` writes)"))


def check_policy_model(source: str | None, fld: str | None = "model.name_or_path") -> None:
    """A policy to load is a model folder (or a hub id) and not a reward model: a
    *ForSequenceClassification loaded as a causal LM gets a fresh random LM head wherever its
    embeddings are not tied, and transformers only logs it."""
    if not source:
        return
    conf = read_model_config(source, fld)
    arch = ((conf or {}).get("architectures") or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        raise ModelError(_named(fld, source, f"is a reward model (architecture {arch}), not a policy (a "
                                             f"*ForCausalLM, as `rlhf sft` writes)"))


# ----------------------------------------------------------------------------- models


def _sync_special_ids(model, tok) -> None:
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    emb = model.get_input_embeddings().weight
    if getattr(emb, "ds_shape", emb.shape)[0] < len(tok):  # ds_shape: the full shape of a ZeRO-3 partition
        model.resize_token_embeddings(len(tok))


def rng_fork():
    """`torch.random.fork_rng` over the CPU generator and this process's CUDA device's: seeding
    inside (a model made from a config) leaves the run's own streams as they were."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def arch_config(model_type: str, arch: dict):
    """transformers' config of `model_type` with the recipe's `model.arch` fields. An unknown model
    type, or a field the config class neither has nor takes (a misspelling: transformers would
    store it and build the model without it), is one line naming `model.arch`."""
    import difflib

    from transformers import AutoConfig

    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        raise ModelError(f"recipe: 'model.arch.model_type' {model_type!r} is not a model type transformers knows"
                         + (f" (did you mean {close[0]!r}?)" if close else "")) from None
    arch = dict(arch)
    for key, v in arch.items():  # a size of 0 or less fails only inside torch ("negative dimension"), after the data
        if isinstance(v, int) and not isinstance(v, bool) and v < 1 and re.search(
                r"size|layers|heads|positions|vocab|^n_(embd|ctx|head|layer|inner)$", key):
            raise ModelError(f"recipe: 'model.arch.{key}' must be >= 1, got {v}")
    for key, v in arch.items():  # YAML 1.1 reads 1e-5 as a string; transformers' strict configs refuse it
        if isinstance(v, str) and isinstance(getattr(defaults, key, None), float):
            try:
                arch[key] = float(v)
            except ValueError:
                pass
    hf_cfg = _for_model(model_type, arch, type(defaults).__name__)
    for key in arch:
        if hasattr(defaults, key) or not hasattr(hf_cfg, key):  # a field, or taken into one (rope_theta)
            continue
        without = _for_model(model_type, {k: v for k, v in arch.items() if k != key}, type(defaults).__name__)
        if {k: v for k, v in hf_cfg.to_dict().items() if k != key} == without.to_dict():  # stored, and nothing else
            close = difflib.get_close_matches(key, list(defaults.to_dict()), n=1)
            raise ModelError(f"recipe: 'model.arch.{key}' is not a field of transformers' {type(defaults).__name__}"
                             + (f" (did you mean '{close[0]}'?)" if close else ""))
    return hf_cfg


def _for_model(model_type: str, arch: dict, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(model_type, **arch)
    except Exception as e:  # a value of the wrong type or out of range (strict configs validate: huggingface_hub's
        if not isinstance(e, TypeError | ValueError) and "Validation" not in type(e).__name__:  # StrictDataclass...)
            raise
        raise ModelError(f"recipe: 'model.arch' does not make a valid {name} ({' '.join(str(e).split())[:300]})") \
            from None


def is_bidirectional(config) -> bool:
    """Whether a model of this config attends to later tokens: an encoder-decoder, or an encoder
    (a model type transformers has a masked-LM class for: BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa,
    ...) not configured as a decoder (`is_decoder`)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return True
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES and \
        not getattr(config, "is_decoder", False)


def causal_lm_problem(config) -> str | None:
    """Why a model of this config cannot be a policy here, or None: an encoder-decoder or an
    encoder (it would read the tokens it predicts: a low loss, and garbage when sampled), no causal
    LM class, or a recurrent model not verified to decode right with rlhf's sampling
    (:data:`RECURRENT_TYPES`: RWKV, xLSTM, RecurrentGemma)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = f"model type '{getattr(config, 'model_type', '?')}'"
    if getattr(config, "is_encoder_decoder", False):
        return f"{kind} is an encoder-decoder; rlhf trains decoder-only causal LMs"
    if is_bidirectional(config):
        return (f"{kind} is a bidirectional encoder: as a causal LM it would see the tokens it predicts; use a "
                f"decoder (or give its config is_decoder: true)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return f"{kind} has no causal LM class in transformers (AutoModelForCausalLM)"
    if getattr(config, "model_type", None) in RECURRENT_TYPES:
        return (f"{kind} keeps a recurrent state that rlhf's sampling is not verified to carry (each step could "
                f"start without it: garbage samples); use a transformer, hybrid or Mamba decoder")
    return None


RECURRENT_TYPES = frozenset({"rwkv", "xlstm", "recurrent_gemma"})
"""Recurrent causal LMs not verified to decode right with rlhf's loop, which hands each step the
cache the last one returned (transformers 5.25). Verified (tests/test_models.py: each sampled
token's log-prob equals a full forward's, left-padded rows decode as alone): Mamba, Falcon-Mamba
(given no mask at a decoding step, rollout.MASKLESS_DECODE_TYPES), Mamba-2, and the hybrid
attention/state-space decoders (Jamba, Bamba, Zamba, Falcon-H1, Granite 4, Nemotron-H, LFM2,
Qwen3-Next)."""


def mixes_tokens_by_convolution(model) -> bool:
    """Whether `model` has a 1-D convolution over the sequence (``nn.Conv1d``: the causal convolution
    of Mamba, Mamba-2 and the hybrids' state-space layers, LFM2's short convolutions, Qwen3-Next's
    gated DeltaNet). GPT-2's ``Conv1D`` is a linear layer, not one of these."""
    return any(isinstance(m, torch.nn.Conv1d) for m in model.modules())


def load_causal_lm(cfg: ModelConfig, tok, seed: int | None = None):
    """The policy: from_pretrained (local/hub/GGUF) or from_config (random init, seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(cfg.dtype)
    if cfg.init == "from_config":
        arch = dict(cfg.arch)
        model_type = arch.pop("model_type", None)
        if not model_type:
            raise ModelError("recipe: 'model.arch.model_type' is required with init: from_config")
        arch.setdefault("vocab_size", len(tok))
        hf_cfg = arch_config(model_type, arch)
        hf_cfg.pad_token_id, hf_cfg.eos_token_id = tok.pad_token_id, tok.eos_token_id
        hf_cfg.bos_token_id = tok.bos_token_id
        problem = causal_lm_problem(hf_cfg)
        if problem:
            raise ModelError(f"recipe: 'model.arch.model_type': {problem}")
        if seed is not None:
            torch.manual_seed(seed)
        with outside_zero3_init():  # the same initial weights on 1 process, DDP and ZeRO-3
            model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    elif cfg.init == "pretrained":
        if not cfg.name_or_path:
            raise ModelError("recipe: 'model.name_or_path' is not set")
        _check_local(cfg.name_or_path, "model.name_or_path")
        kwargs = dict(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, dtype=dtype)
        if cfg.gguf_file:
            kwargs["gguf_file"] = cfg.gguf_file
        elif not cfg.trust_remote_code:  # (a remote-code class is not in transformers' mappings)
            problem = causal_lm_problem(AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision))
            if problem:
                raise ModelError(f"{cfg.name_or_path}: {problem}")
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
        except OSError as e:
            raise ModelError(f"{cfg.name_or_path}: cannot load a causal LM ({str(e).splitlines()[0]})") from None
        if cfg.gguf_file:
            clear_quantization(model)
    else:
        raise ModelError(f"recipe: 'model.init' must be 'pretrained' or 'from_config', got '{cfg.init}'")
    _sync_special_ids(model, tok)
    contiguous_head_input(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    return model


def contiguous_head_input(model) -> None:
    """Give the LM head a contiguous input. With `logits_to_keep` (the response positions only),
    transformers applies the head to `hidden_states[:, -k:, :]`, a strided view; `F.linear` cannot
    fold a strided 3D input into one matrix product and runs a batched product over the weight
    broadcast to every row instead: SmolLM2's 49k x 576 head on 8 x 33 positions, fp32 on the CPU,
    125 ms against 83 ms for the same product on a contiguous copy, and 1,024 ms against 45 ms
    under matmul_precision 'medium', where the broadcast weight is copied per row. A forward
    pre-hook copies the (small) input instead; the product is the same to float rounding."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(_contiguous_first_input)


def _contiguous_first_input(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def enable_gradient_checkpointing(model) -> None:
    """Activation recomputation in training-mode forwards (transformers' own; the non-reentrant
    variant, which works with frozen inputs, LoRA and ZeRO-3). Eval-mode forwards, generation
    included, are unaffected and keep their KV cache."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"recipe: 'model.gradient_checkpointing': {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # LoRA: the checkpointed blocks' inputs must carry grad


def compile_blocks(model: nn.Module) -> int:
    """Regional `torch.compile`: every transformer block of `model` (the classes its transformers
    `_no_split_modules` names, e.g. LlamaDecoderLayer, embeddings left out; without that list, the
    children of its longest `nn.ModuleList`) compiled in place with `Module.compile()`, so
    parameter names, state dicts and checkpoints are unchanged. The blocks run the same code, so
    they share compiled graphs: compiling 30 costs about one block's compile (a graph per model
    and new shape until dynamo marks the shape dynamic). Returns the number of blocks compiled.

    Full-sequence forwards must pass `use_cache=False`: with a KV cache each block's layer index
    becomes a guard and every block would compile again. Outside training, callers run the
    blocks eagerly (:func:`eager_blocks`)."""
    import torch._dynamo

    names = set()
    for m in model.modules():  # the HF model may sit inside a wrapper (ValueModel, peft)
        names.update(n for n in getattr(m, "_no_split_modules", None) or [] if not n.endswith("Embeddings"))
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:  # (DistilBERT, DeBERTa-v2 name none): the layer stack
        stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        blocks = list(max(stacks, key=len)) if stacks else []
    if not blocks:
        raise ModelError(f"recipe: 'compile': found no transformer blocks in {type(model).__name__}")
    # the policy's and value model's blocks share the code object, hence its cache entries: one per
    # (model, static / dynamic shapes), more than dynamo's default of 8 with a few shape changes
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for b in blocks:
        b.compile()
    return len(blocks)


def eager_blocks():
    """Inside, blocks compiled by :func:`compile_blocks` run eagerly: sampling (a KV cache would
    recompile every block, see above), and PPO's no-grad experience and evaluation passes, where the
    compiled CPU kernels were slower than eager ones (docs/performance-history.md) and where eager passes
    keep the policy's and reference's log-probs bit-equal before any update. A no-op for eager models."""
    return torch.compiler.set_stance("force_eager")


def outside_zero3_init():
    """Build a model from a config with ordinary (not partitioned) initialisation even when a
    ZeRO-3 accelerator exists: DeepSpeed partitions it at prepare, and the weights match a
    1-process run (zero.Init draws the random init differently)."""
    import contextlib

    try:
        import transformers.integrations.deepspeed as hf_ds
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def ctx():
        saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
        hf_ds._hf_deepspeed_config_weak_ref = None
        try:
            yield
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved

    return ctx()


def clear_quantization(model) -> None:
    """A GGUF model is dequantised on load but still marked quantised; clear that so it trains/saves."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def add_lora(model, cfg: ModelConfig):
    try:
        from peft import LoraConfig as PeftLora, get_peft_model
    except ImportError:  # pragma: no cover - peft is a dependency of the dev/peft extras
        raise ModelError("recipe: 'model.lora.enabled' needs peft (pip install 'rlhf[peft]')") from None
    lc = cfg.lora
    spec = PeftLora(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=lc.target_modules,
                    task_type="CAUSAL_LM")
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in lc.target_modules or [] if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:  # (peft itself stops only when none matches)
        raise ModelError(f"recipe: 'model.lora.target_modules' names no module of this model: {', '.join(missing)}")
    tied = tied_targets(model, lc.target_modules or [])
    if tied:  # (the merged adapter would land in both: the saved model is not the one trained)
        name, other = tied[0]
        raise ModelError(f"recipe: 'model.lora.target_modules' names {name}, whose weight is tied to {other} "
                         f"(tie_word_embeddings): merging its adapter when the model is saved would change both, and "
                         f"the saved model would not be the one trained; adapt other modules")
    try:
        return get_peft_model(model, spec)
    except ValueError as e:  # peft's: a module it cannot adapt (a norm, an activation)
        if lc.target_modules is None:  # (peft has no default targets for this model type: Phi-3's fused qkv_proj)
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ModelError(f"recipe: 'model.lora.target_modules': peft knows no default modules to adapt in model "
                             f"type '{getattr(model.config, 'model_type', '?')}'; name them (its linear layers: "
                             f"{', '.join(linear)})") from None
        raise ModelError(f"recipe: 'model.lora.target_modules' names modules peft cannot adapt "
                         f"({' '.join(str(e).split())[:200]})") from None


def tied_targets(model: nn.Module, targets: list[str]) -> list[tuple[str, str]]:
    """(module, other module) for each module a LoRA target name matches (the name, or a name ending
    in '.' + it) whose weight another module shares: the LM head and the input embeddings under
    ``tie_word_embeddings``."""
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(n)
    out = []
    for n, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and any(n == t or n.endswith("." + t) for t in targets):
            others = [o for o in owners[id(w)] if o != n]
            if others:
                out.append((n, others[0]))
    return out


DROPOUT_NAMES = ("dropout", "layerdrop")
"""Float attributes and config fields naming a rate of dropped activations or layers: OPT's
`dropout` and `layerdrop`, the Llama family's `attention_dropout`, Falcon's `hidden_dropout`."""


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in policy, reference, value and reward models [N]: every `nn.Dropout`, and every
    rate a module keeps as a float for functional dropout (OPT's `self.dropout`, the Llama family's
    `self.attention_dropout`, read in training mode only) or its config holds, sub-configs too
    (a module built later from it, a LoRA wrap, reads 0)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if isinstance(value, float) and not isinstance(value, bool) and any(k in name for k in DROPOUT_NAMES):
                setattr(m, name, 0.0)
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for cfg in [config, *(v for v in vars(config).values() if hasattr(v, "to_dict"))]:
                for name, value in list(vars(cfg).items()):
                    if isinstance(value, float) and any(k in name for k in DROPOUT_NAMES):
                        setattr(cfg, name, 0.0)


def position_limit(model) -> int | None:
    """How many positions a model with learned absolute position embeddings reads (GPT-2's
    `n_positions`, OPT's and BERT's `max_position_embeddings`), or None where positions are
    computed (RoPE, ALiBi) and a longer sequence still runs. A longer sequence indexes past the
    position table: an IndexError, or on a GPU a device-side assert, in the middle of a run."""
    m = unwrap(model)
    config = getattr(m, "config", None)
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or isinstance(n, bool) or getattr(config, "position_biased_input", True) is False:
        return None  # (DeBERTa-v2/v3: relative positions only, whatever its table's size)
    for name, sub in m.named_modules():  # the absolute table: GPT-2's wpe, BERT's and OPT's/BART's names
        if isinstance(sub, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings",
                                                                         "embed_positions"):
            first = sub.padding_idx + 1 if sub.padding_idx is not None else 0  # RoBERTa's start after padding
            return min(n, sub.num_embeddings - first)  # (OPT's table has 2 more rows: an offset)
    return None


ROWS_FIX = "lower data.max_length and set data.skip_bad_rows, or use a model with more positions"
"""What to do about training rows longer than the model's positions (:func:`check_positions`)."""


def check_positions(model, longest: int, what: str, fix: str = ROWS_FIX) -> None:
    """A one-line ModelError, before training, when `longest` tokens (what: where they come from)
    are more than the model's learned positions (:func:`position_limit`)."""
    limit = position_limit(model)
    if limit is not None and longest > limit:
        raise ModelError(f"{what}: {longest} tokens, but the model has learned positions for only {limit} "
                         f"(max_position_embeddings / n_positions); {fix}")


def unwrap(model):
    """The plain transformers model under DDP / accelerate / peft wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def save_pretrained(model, tok, out_dir: str | Path, extra_config: dict | None = None,
                    state_dict: dict | None = None) -> None:
    """Save an HF folder with safetensors (merging LoRA adapters so plain from_pretrained loads it)."""
    model = unwrap(model)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        import copy

        if state_dict is None:
            model = copy.deepcopy(model).merge_and_unload()
        else:  # weights given apart from the (e.g. ZeRO-3-partitioned) model: merge them in a plain copy
            model = _plain_peft_copy(model, state_dict).merge_and_unload()
            state_dict = None
    if extra_config:
        for k, v in extra_config.items():
            setattr(model.config, k, v)
    from .textio import disk_errors

    with disk_errors(Path(out_dir)):  # (safetensors' "os error 28" is an OSError naming the folder)
        model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
        tok.save_pretrained(out_dir)


def _plain_peft_copy(peft_model, state_dict: dict):
    """A non-partitioned CPU copy of a peft model holding `state_dict` (peft's key names)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base_model = peft_model.get_base_model()
    dtype = next(v.dtype for k, v in state_dict.items() if "lora_" not in k and v.is_floating_point())
    with outside_zero3_init():
        base = AutoModelForCausalLM.from_config(base_model.config, dtype=dtype)
    name = peft_model.active_adapter if isinstance(peft_model.active_adapter, str) else "default"
    copy_ = get_peft_model(base, peft_model.peft_config[name])
    copy_.load_state_dict(state_dict, strict=True)
    return copy_


def count_parameters(model) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # full size of ZeRO-3 partitions


def save_model_files(model, tok, out: Path, extra_config: dict | None = None, state_dict: dict | None = None) -> None:
    """Write the HF folder into `out` through a temporary folder, each file moved in atomically."""
    import os
    import shutil

    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tok, tmp, extra_config, state_dict)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
