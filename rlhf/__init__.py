"""rlhf: the InstructGPT recipe end to end — SFT, a pairwise reward model, PPO with a KL penalty.

Heavy libraries (transformers, accelerate, deepspeed) are imported where they are used, so
``import rlhf`` stays cheap.
"""

__version__ = "0.1.0"
