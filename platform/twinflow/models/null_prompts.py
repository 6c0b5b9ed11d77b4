"""The CFG null prompt each caption encoder gets by default (kept free of torch: `ModelConfig` reads it).

The reference implementation (inclusionAI/TwinFlow) pairs every caption of its Qwen-Image network with
"Generate an image." for text-to-image CFG (`QwenImage.encode_prompt`), as it does for its SD3 and
OpenUni networks, each through its own encoder. MiniLM is ours alone (no reference network reads it),
so it keeps the empty caption.
"""

from __future__ import annotations

QWEN_NULL_PROMPT = "Generate an image."
_DEFAULTS = {"qwen2.5-vl": QWEN_NULL_PROMPT, "minilm": ""}


def default_null_prompt(kind: str) -> str:
    """The null prompt for text encoder `kind` when the job names none."""
    return _DEFAULTS.get(kind, "")
