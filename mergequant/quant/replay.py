"""Replaying a decoder layer's attention output once the attention's Linears are final.

A true-sequential quantizer runs each decoder layer's forward once per group of Linears. GPTQ on a
Llama layer: q/k/v, o, gate/up, down, then the pass that computes the layer's output for the next
layer; on a mixture-of-experts layer also one pass per batch of expert down projections (eight on
Mixtral-8x7B, whose down Hessians are taken one expert at a time). Once o_proj is quantized the
attention's output no longer changes for the rest of the layer, yet every later pass recomputes it:
the q/k/v/o products, the rotary embedding and the softmax, on every calibration token.

``AttentionReplay`` is installed on the attention module (as an instance ``forward``, like the
forwards of ``mergequant.quant.compact``) when the first group after the attention starts. It
records the module's output for each calibration chunk during the first pass and hands the recorded
output back on later passes: the same values the module would compute (the same module, same weights,
same inputs), without computing them. Every pass runs the chunks in the same order and, after the
attention is final, every pass reaches the attention (a pass is only stopped early at a later module),
so the k-th call of a pass is chunk ``k mod chunks``. A checksum of each call's input guards that
assumption: on a mismatch the module simply computes its output (correct, only slower).

No family's decoder layer modifies the attention output in place (transformers 5: ``residual +
hidden_states``), so one recorded tensor can serve every pass. The recording costs the attention
outputs of all chunks in the compute dtype; it is only made when that fits ``REPLAY_BYTES``.
Measured on the tiny Mixtral (GPTQ, all-token calibration): see docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentionReplay", "REPLAY_BYTES", "checksum"]

# Largest recording (all chunks' attention outputs) worth holding: beyond it the attention is recomputed.
# 1 GiB is 64k tokens of a 4096-wide model in float32 (the MoE benchmark's 4k tokens take 64 MiB).
REPLAY_BYTES = 1 << 30


# elements of a chunk's input summed into its checksum (every step-th one): telling the chunks of a
# calibration set apart needs no full sum, which cost 3% of a tiny Mixtral's GPTQ run
CHECKSUM_SAMPLES = 1 << 14


def checksum(x: torch.Tensor) -> tuple:
    """Identifies a chunk's input: its shape, dtype, a float64 sum of evenly spaced elements and the
    last element (deterministic for equal inputs). A guard against a pass that feeds the chunks in
    another order or different ones (distinct calibration chunks differ in all of these), not a hash of
    every element: the passes of one layer feed the very same tensors."""
    flat = x.reshape(-1)
    if not flat.numel():
        return tuple(x.shape), x.dtype
    step = max(1, flat.numel() // CHECKSUM_SAMPLES)
    return tuple(x.shape), x.dtype, float(flat[::step].sum(dtype=torch.float64)), float(flat[-1])


class AttentionReplay:
    """Instance ``forward`` of an attention module: records one output per chunk, then replays them."""

    def __init__(self, module: nn.Module, chunks: int):
        self.compute = type(module).forward.__get__(module)  # the module's own forward
        self.chunks = chunks
        self.keys: list[tuple] = []
        self.outputs: list = []
        self.calls = 0
        self.replayed = 0
        self.recomputed = 0

    @classmethod
    def install(cls, module: nn.Module, chunks: int, tokens: int, width: int, dtype: torch.dtype) -> "AttentionReplay | None":
        """Install on ``module`` when the recording of ``tokens`` outputs of ``width`` in ``dtype`` fits
        ``REPLAY_BYTES``; None (nothing installed) otherwise or when ``module`` already has a forward
        of its own."""
        size = tokens * width * torch.empty((), dtype=dtype).element_size()
        if chunks < 1 or size > REPLAY_BYTES or "forward" in module.__dict__:
            return None
        replay = cls(module, chunks)
        module.forward = replay
        return replay

    @classmethod
    def install_recorded(cls, module: nn.Module, keys: list[tuple], outputs: list) -> "AttentionReplay | None":
        """Install on ``module`` with the recording already made: ``keys[j]`` the ``checksum`` of chunk j's
        attention input, ``outputs[j]`` the module's output for it. GPTQ builds these from its o_proj
        pass (o_proj's inputs, kept, put through the quantized o_proj): the attention is then never
        computed again for the layer. None when ``module`` already has a forward of its own."""
        if not keys or len(keys) != len(outputs) or "forward" in module.__dict__:
            return None
        replay = cls(module, len(keys))
        replay.keys, replay.outputs = list(keys), list(outputs)
        module.forward = replay
        return replay

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs):
        j = self.calls % self.chunks
        self.calls += 1
        key = checksum(hidden_states)
        if len(self.outputs) < self.chunks:  # the recording pass
            out = self.compute(hidden_states, *args, **kwargs)
            self.keys.append(key)
            self.outputs.append(out)
            return out
        if key == self.keys[j]:
            self.replayed += 1
            return self.outputs[j]
        self.recomputed += 1
        return self.compute(hidden_states, *args, **kwargs)
