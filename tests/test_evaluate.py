"""Perplexity: every token after the first scored exactly once, against independent references."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from mergequant.evaluate import perplexity
from mergequant.errors import MergeQuantError

from helpers import cli, run_cli


class Bigram(torch.nn.Module):
    """A fake LM whose next-token logits depend only on the current token: its NLL does not depend on
    context, so any window schedule must give the same perplexity as scoring the whole stream once."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def forward(self, ids):
        return SimpleNamespace(logits=self.table[ids])


def _direct_nll(model: Bigram, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(model.table.double(), dim=-1)
    return float(-sum(logp[ids[t - 1], ids[t]] for t in range(1, ids.numel())) / (ids.numel() - 1))


@pytest.mark.parametrize("seqlen, stride", [(16, 16), (16, 5), (16, 1), (7, 3), (1000, 1000), (2, 2)])
def test_each_token_scored_once(seqlen, stride):
    ids = torch.randint(0, 50, (203,), generator=torch.Generator().manual_seed(1))
    model = Bigram(50)
    res = perplexity(model, ids, seqlen=seqlen, stride=stride)
    assert res.tokens == ids.numel() - 1
    assert res.nll == pytest.approx(_direct_nll(model, ids), rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(res.nll))


def test_uniform_model_has_vocab_size_perplexity():
    class Uniform(torch.nn.Module):
        def forward(self, ids):
            return SimpleNamespace(logits=torch.zeros(ids.shape[0], ids.shape[1], 37))

    res = perplexity(Uniform(), torch.randint(0, 37, (100,)), seqlen=10, stride=4)
    assert res.perplexity == pytest.approx(37.0)


def test_matches_transformers_loss_on_a_real_model(bf16_models):
    """A real causal LM, non-overlapping windows: our sum of log-probs equals transformers' own loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf16_models["base"], dtype=torch.float32).eval()
    ids = torch.randint(0, 2048, (100,), generator=torch.Generator().manual_seed(2))
    seqlen = 32
    res = perplexity(model, ids, seqlen=seqlen)
    # reference, windows worked out by hand: (begin, end, first scored token); the last window keeps a
    # full 32 tokens of context. transformers shifts the labels itself and ignores -100.
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in [(0, 32, 1), (31, 63, 32), (62, 94, 63), (68, 100, 94)]:
            window = ids[begin:end].unsqueeze(0)
            labels = window.clone()
            labels[:, :first - begin] = -100
            n = end - first
            total += float(model(window, labels=labels).loss) * n
            count += n
    assert res.windows == 4
    assert res.tokens == count == 99
    assert res.nll == pytest.approx(total / count, rel=1e-5)


def test_bad_stride():
    with pytest.raises(MergeQuantError, match="--stride"):
        perplexity(Bigram(5), torch.arange(5), seqlen=4, stride=5)


@pytest.mark.slow
def test_eval_cli(bf16_models, tmp_path):
    data = tmp_path / "heldout.txt"
    data.write_text("It is a truth universally acknowledged, that a single man. " * 30)
    proc = cli("eval", bf16_models["base"], "--data", data, "--seqlen", 64, "--json", "-q", check=True)  # in-process
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["seqlen"] == 64 and res["tokens"] > 100
    assert 1 < res["perplexity"] < 2048 * 4  # a random tiny model: near uniform over 2048 tokens, never absurd
    bad = run_cli("eval", tmp_path / "nope", "--data", data)  # the real CLI: exit status and one error line
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "nope" in bad.stderr
