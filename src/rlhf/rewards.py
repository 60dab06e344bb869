"""Placeholder replaced below."""


class RewardError(ValueError):
    pass
