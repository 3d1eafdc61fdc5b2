"""The recipe's decoding settings look at the answer's own tokens, never the prompt's."""

from __future__ import annotations

import pytest
import torch

from medtune import config as config_mod
from medtune import decoding


def _apply(settings: dict, prompt: list[int], answer: list[int], vocab: int = 12) -> torch.Tensor:
    procs = decoding.processors(config_mod.DecodingConfig(**settings), prompt_width=len(prompt))
    ids, scores = torch.tensor([prompt + answer]), torch.ones(1, vocab)
    for p in procs:
        scores = p(ids, scores)
    return scores[0]


def test_ngram_blocking_bans_the_answers_repeats_not_the_prompts():
    # the prompt holds the bigram (6, 7), the answer (6, 8) and ends in 6: only 8 is banned next
    scores = _apply({"no_repeat_ngram_size": 2}, prompt=[6, 7], answer=[6, 8, 6])
    assert scores[8] == -float("inf")
    assert torch.isfinite(scores[7]) and torch.isfinite(scores[:8]).sum() == 8


def test_repetition_penalty_divides_the_answers_tokens_only():
    scores = _apply({"repetition_penalty": 1.25}, prompt=[9, 4], answer=[3])
    assert scores[3] == pytest.approx(1 / 1.25)
    assert scores[9] == scores[4] == scores[0] == 1.0


def test_plain_decoding_adds_nothing():
    assert config_mod.DecodingConfig().plain and decoding.processors(config_mod.DecodingConfig(), 5) == []
    assert not config_mod.DecodingConfig(no_repeat_ngram_size=3).plain


def test_kserve_cannot_serve_a_decoding_it_cannot_apply():
    from medtune.pipeline import CLUSTER_PROFILE

    deploy = ["deploy.enabled=true", f"deploy.runtime_image=vllm/vllm-openai:v0.11.0@sha256:{'a' * 64}"]
    config_mod.load(CLUSTER_PROFILE, deploy)  # plain decoding deploys
    with pytest.raises(config_mod.ConfigError, match="deploy.enabled with decoding"):
        config_mod.load(CLUSTER_PROFILE, [*deploy, "decoding.no_repeat_ngram_size=3"])
