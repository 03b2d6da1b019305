"""Drop-in integrations of fastsft's kernels into other trainers.

``fastsft.integrations.hf.patch(model)`` makes a transformers ``*ForCausalLM`` (bare or inside a PEFT
wrapper) compute its training loss with :func:`fastsft.loss.fused_linear_cross_entropy`, for the
HF ``Trainer``, TRL's ``SFTTrainer`` and hand-written loops alike. The names are loaded lazily so
that importing this package does not import transformers.
"""

from __future__ import annotations

__all__ = ["patch", "unpatch", "is_patched"]


def __getattr__(name):
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
