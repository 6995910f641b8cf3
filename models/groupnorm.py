"""Placeholder until the plugin binding lands: the fused kernel is never available."""


def available() -> bool:
    return False
