"""The name a misspelt one was probably meant to be: of a setting, flag, command, task, language or choice."""

import difflib


def did_you_mean(word, names, quote: str = "'", aliases: dict[str, str] | None = None) -> str:
    """' (did you mean 'lr'?)' for a misspelt name, or ''. Names may be flags: '--lr-rate' is compared with '--lr'
    as lr_rate with lr. aliases: other names for some of the names (another trainer's learning_rate for lr)."""
    if not isinstance(word, str):
        return ""
    key = word.lstrip("-").replace("-", "_")
    plain = {n.lstrip("-").replace("-", "_"): n for n in names if isinstance(n, str)}
    # a near-identical name first; then an alias, or a name the word contains as a whole part ('lr_rate' -> 'lr',
    # which difflib's ratio misses for short names, not the merely similar 'lora_rank'); then any similar name
    match = difflib.get_close_matches(key, list(plain), n=1, cutoff=0.8)
    if not match and (aliases or {}).get(key) in plain:
        match = [aliases[key]]
    if not match:
        parts = key.split("_")
        match = sorted((n for n in plain if n and _has_parts(parts, n.split("_"))), key=len)[-1:]
    if not match:
        match = difflib.get_close_matches(key, list(plain), n=1, cutoff=0.6)
    return f" (did you mean {quote}{plain[match[0]]}{quote}?)" if match else ""


def _has_parts(parts: list[str], sub: list[str]) -> bool:
    return any(parts[i:i + len(sub)] == sub for i in range(len(parts) - len(sub) + 1))
