"""PPO-ptx [IGPT eq. 2]: the policy keeps a next-token loss on pretraining/SFT rows.

InstructGPT mixes gamma_ptx * log-likelihood of pretraining data into the PPO objective to limit
the "alignment tax". Each PPO micro-batch draws one micro-batch of these rows, in a seeded order
that a resumed run continues exactly.
"""

from __future__ import annotations

import torch

from .algos import core
from .engine import epoch_permutation
from .tokenization import collate_sft


class PtxIterator:
    """PPO-ptx [IGPT eq. 2]: next-token loss on pretraining/SFT rows, one micro-batch per call."""

    def __init__(self, feats: list, micro_batch_size: int, pad_id: int, seed: int, device):
        self.feats, self.mbs, self.pad_id, self.seed, self.device = feats, micro_batch_size, pad_id, seed, device
        self.epoch, self.pos, self.perm = 0, 0, epoch_permutation(len(feats), seed, 0)

    def next_batch(self):
        if self.pos + self.mbs > len(self.perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self.perm = epoch_permutation(len(self.feats), self.seed, self.epoch)
        batch = [self.feats[i] for i in self.perm[self.pos : self.pos + self.mbs]]
        self.pos += self.mbs
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.pos = d["epoch"], d["pos"]
        self.perm = epoch_permutation(len(self.feats), self.seed, self.epoch)

    def loss(self, policy) -> torch.Tensor:
        ids, mask, labels = collate_sft(self.next_batch(), self.pad_id, self.device)
        s, n = core.lm_loss_sum(policy(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
        return s / max(n, 1)
