"""PPO's value model (the critic): a transformer backbone with a scalar head read at every position.

V(s_t) is read at the position *before* response token t -- the state in which the token was
chosen -- the same off-by-one as the log-probs [N]. Where its weights come from is a registered
choice (``value_init``): the reward model's backbone and head (InstructGPT), or the policy's
backbone with a fresh head. A critic-free advantage estimator builds no value model at all.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .algos.registry import Registry
from .models import ModelError, disable_dropout, enable_gradient_checkpointing, is_bidirectional, load_causal_lm, rng_fork
from .rollout import position_ids_from_mask

VALUE_INITS = Registry("value_init", "where the value model's weights come from")


class ValueModel(nn.Module):
    """A transformer backbone with a scalar head read at every position: V(s_t), shape (B, T)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, input_ids, attention_mask, position_ids=None):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        h = out.last_hidden_state
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()


def backbone_of(model: nn.Module, path: str) -> nn.Module:
    """The transformer body under an LM or classification head: the attribute its class's
    `base_model_prefix` names (model, transformer, gpt_neox, ...), else, for remote code whose prefix
    is not its attribute's name, its one child that is itself a PreTrainedModel."""
    from transformers import PreTrainedModel

    body = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    if isinstance(body, nn.Module) and body is not model:
        return body
    found = [m for m in model.children() if isinstance(m, PreTrainedModel)]
    if len(found) != 1:
        raise ModelError(f"{path}: cannot find the transformer body of {type(model).__name__} (its base_model_prefix "
                         f"'{getattr(model, 'base_model_prefix', '')}' is not an attribute, and it has "
                         f"{len(found)} pretrained sub-models); use a standard transformers model")
    return found[0]


def response_values(value_model, ids: torch.Tensor, mask: torch.Tensor, response_len: int) -> torch.Tensor:
    """(B, R) V(s_t) for each response token t, read at the position before it [N]."""
    return value_model(ids, mask, position_ids_from_mask(mask))[:, -response_len - 1 : -1]


@VALUE_INITS.register("reward_model")
def from_reward_model(cfg, policy_tok, reward_model) -> tuple[nn.Module, nn.Module]:
    """The reward model's backbone and scalar head (InstructGPT); needs the policy's tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from .rewards import score_head

    if reward_model is None:
        raise ModelError("recipe: 'value_init: reward_model' needs 'reward_model' (or use value_init: policy)")
    if not reward_model.same_tokenizer(policy_tok):
        raise ModelError("recipe: the reward model's tokenizer differs from the policy's; use 'value_init: policy'")
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model.path)
    if is_bidirectional(rm.config):  # (it would read the rest of the response: no value of a prefix)
        raise ModelError("recipe: a bidirectional encoder cannot give per-token values; use 'value_init: policy'")
    return backbone_of(rm, reward_model.path), score_head(rm)


@VALUE_INITS.register("policy")
def from_policy(cfg, policy_tok, reward_model) -> tuple[nn.Module, nn.Module]:
    """The policy's backbone and a fresh head, N(0, 1/sqrt(d + 1)) from its own seeded stream [N+].
    The backbone is loaded as the policy is (:func:`load_causal_lm`: a checkpoint, a GGUF file, or
    `init: from_config` with the run's seed, so the same initial weights), its LM head dropped."""
    # the policy's weights, without its LoRA adapters (the value model trains all of its own) and without
    # activation checkpointing (load_value_model applies the recipe's to the backbone)
    mc = dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False),
                             gradient_checkpointing=False)
    with rng_fork():  # (the run's own RNG streams are not touched)
        lm = load_causal_lm(mc, policy_tok, seed=cfg.seed)
    backbone = backbone_of(lm, str(mc.name_or_path))
    d = backbone.config.hidden_size
    head = nn.Linear(d, 1, bias=False, dtype=torch.float32)
    with torch.no_grad():  # its own seeded stream: the same head however the backbone was loaded
        g = torch.Generator().manual_seed(cfg.seed)
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(d + 1))
    return backbone, head


def load_value_model(cfg, policy_tok, reward_model) -> ValueModel:
    """The value model `cfg.value_init` names, dropout off, activation checkpointing as the recipe asks."""
    backbone, head = VALUE_INITS[cfg.value_init].fn(cfg, policy_tok, reward_model)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    model = ValueModel(backbone, head)
    disable_dropout(model)
    return model
