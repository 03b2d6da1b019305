"""What one micro-batch of training costs: the model's forward(s) and the loss, as one unit the loop calls.

    loss = sum over the batch's response tokens of CE(y_t | x, y_<t)
           (+ kl_to_base * KL(p_base || p_tuned) over the covered tokens)        / the step's response tokens

The KL anchor's base is the model itself with its LoRA adapters off (``adapters_disabled``), run once more
without gradients and in eval mode (no dropout, no NEFTune noise: the base is the clean anchor); its hidden
states go into the fused loss with the tuned ones, which computes both models' logits chunk by chunk. NEFTune
noise is the backbone's (``Backbone.neftune_alpha``), switched on here.

With ``kl_topk`` the base ran once before training instead: each batch carries the base's cached top-k
log-probs (``base_topk_ids``, ``base_topk_logp``, laid out like its tokens by ``BatchOrder``) and the KL is the
coarse-grained one of :mod:`fastsft.loss_kl_topk`, with no base forward here.

``inputs(batch) -> dict`` adds forward arguments: a multimodal batch's images (``fastsft.multimodal.training``).
"""

from __future__ import annotations

import contextlib

import torch

from fastsft.loss import fused_linear_cross_entropy
from fastsft.loss_kl_topk import linear_cross_entropy_kl_topk
from fastsft.model.lora import adapters_disabled

__all__ = ["Objective", "packed_args"]


def packed_args(batch: dict, device) -> dict:
    """The packed-row arguments of the model's forward (none for padded batches)."""
    if "cu_seqlens" not in batch:
        return {}
    return {"cu_seqlens": batch["cu_seqlens"].to(device), "max_seqlen": batch["max_seqlen"]}


class Objective:
    """``objective(batch, num_items) -> (loss, parts)``: the loss of one micro-batch, summed over its tokens
    and divided by ``num_items`` (the response tokens of the whole step), ready for ``backward``; ``parts``
    holds floats for the metrics (``kl``: the anchor's mean KL per response token, unweighted)."""

    def __init__(self, model, device, *, kl_to_base: float = 0.0, kl_tokens: str = "response",
                 neftune_alpha: float = 0.0, kernels: str = "auto", autocast=contextlib.nullcontext,
                 kl_topk: bool = False, inputs=None):
        if kl_tokens not in ("response", "all"):
            raise ValueError(f"kl_tokens must be 'response' or 'all', got {kl_tokens!r}")
        self.model, self.device, self.autocast = model, device, autocast
        self.kl_to_base, self.kl_tokens, self.kernels = float(kl_to_base), kl_tokens, kernels
        self.kl_topk = bool(kl_topk) and self.kl_to_base > 0
        self.inputs = inputs  # batch -> more forward arguments (a multimodal batch's images)
        model.model.neftune_alpha = float(neftune_alpha)

    def forward_args(self, batch: dict) -> dict:
        args = {"position_ids": batch["position_ids"].to(self.device), **packed_args(batch, self.device)}
        if "lengths" in batch and "cu_seqlens" not in batch:
            args["seq_lengths"] = batch["lengths"].to(self.device)  # NEFTune's L of right-padded rows
        if self.inputs is not None:
            args.update(self.inputs(batch))
        return args

    @torch.no_grad()
    def base_hidden(self, input_ids: torch.Tensor, args: dict) -> torch.Tensor:
        """The base model's hidden states: the same weights with the adapters off, in eval mode."""
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                return model(input_ids, **args)
        finally:
            model.train(was_training)

    def kl_mask(self, batch: dict) -> torch.Tensor | None:
        """With kl_tokens "all": every position whose next token is a real token of the same sequence."""
        if self.kl_tokens != "all":
            return None
        pos = batch["position_ids"]
        follows = torch.zeros_like(pos, dtype=torch.bool)
        follows[:, :-1] = pos[:, 1:] == pos[:, :-1] + 1  # the next position continues this sequence
        real = batch.get("lengths", batch.get("row_lengths"))  # each row's real tokens come first
        if real is not None:  # padding positions run on (or restart) past them: never covered
            follows &= torch.arange(pos.shape[1])[None, :] < (real[:, None] - 1)
        return follows.to(self.device)

    def __call__(self, batch: dict, num_items: int) -> tuple[torch.Tensor, dict]:
        ids = batch["input_ids"].to(self.device)
        args = self.forward_args(batch)
        if self.kl_topk:
            with self.autocast():
                hidden = self.model(ids, **args)
                loss, kl = linear_cross_entropy_kl_topk(
                    hidden, self.model.lm_head.weight, batch["targets"].to(self.device),
                    batch["base_topk_ids"], batch["base_topk_logp"], kl_beta=self.kl_to_base,
                    kl_mask=self.kl_mask(batch), reduction="sum", num_items=num_items,
                    softcap=self.model.config.final_logit_softcapping)
            return loss, {"kl": float(kl.detach())}
        with self.autocast():
            base = self.base_hidden(ids, args) if self.kl_to_base else None
            hidden = self.model(ids, **args)
            out = fused_linear_cross_entropy(
                hidden, self.model.lm_head.weight, batch["targets"].to(self.device), reduction="sum",
                num_items=num_items, kernels=self.kernels, softcap=self.model.config.final_logit_softcapping,
                base_hidden=base, kl_beta=self.kl_to_base, kl_mask=self.kl_mask(batch) if base is not None else None,
                return_kl=base is not None)
        if base is None:
            return out, {}
        loss, kl = out
        return loss, {"kl": float(kl.detach())}
