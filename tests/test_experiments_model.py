"""The LLaMA-style decoder: shapes, loss, causality, rotary embeddings, parameter names."""

from __future__ import annotations

import math

import pytest
import torch

from experiments.model import (
    CONFIGS,
    Decoder,
    apply_rotary,
    count_parameters,
    get_config,
    rotary_tables,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def tiny() -> Decoder:
    torch.manual_seed(0)
    return Decoder(get_config("tiny", vocab_size=300))


def test_forward_returns_logits_of_batch_seq_vocab(tiny: Decoder) -> None:
    idx = torch.randint(0, 300, (2, 16))
    assert tiny(idx).shape == (2, 16, 300)


def test_initial_loss_is_near_log_vocab(tiny: Decoder) -> None:
    idx = torch.randint(0, 300, (4, 32))
    loss = tiny(idx[:, :-1], idx[:, 1:])
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(300)) < 0.3


def test_loss_backward_reaches_every_parameter(tiny: Decoder) -> None:
    idx = torch.randint(0, 300, (2, 9))
    tiny(idx[:, :-1], idx[:, 1:]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.parameters())


def test_future_tokens_do_not_change_past_logits(tiny: Decoder) -> None:
    idx = torch.randint(0, 300, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 300
    torch.testing.assert_close(tiny(idx)[:, :8], tiny(changed)[:, :8])


def test_sequence_longer_than_max_is_refused(tiny: Decoder) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny(torch.zeros(1, tiny.config.max_seq_len + 1, dtype=torch.long))


def test_rotary_scores_depend_only_on_relative_position() -> None:
    cos, sin = rotary_tables(8, 32, 10000.0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rotary(q.float().view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rotary(k.float().view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(3, 1), score(12, 10), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_linear_names_allow_name_based_grouping(tiny: Decoder) -> None:
    linear = [n for n, m in tiny.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "lm_head" in linear
    blocks = [n for n in linear if n != "lm_head"]
    assert len(blocks) == len(PROJECTIONS) * tiny.config.n_layers
    assert all(any(p in n for p in PROJECTIONS) for n in blocks)
    assert "embed_tokens.weight" in dict(tiny.named_parameters())


def test_param_groups_project_exactly_the_block_matrices(tiny: Decoder) -> None:
    adarank = pytest.importorskip("adarank")
    groups = adarank.param_groups(tiny, exclude=("embed", "lm_head"))
    low = next(g for g in groups if g["lowrank"])
    assert len(low["params"]) == len(PROJECTIONS) * tiny.config.n_layers
    assert not any("embed" in n or "lm_head" in n for n in low["param_names"])


def test_named_shapes_have_the_intended_sizes() -> None:
    assert count_parameters(Decoder(get_config("tiny")))["total"] < 1_000_000
    assert 2e6 < count_parameters(Decoder(get_config("cpu")))["total"] < 1e7
    shape = CONFIGS["60m"]
    assert (shape.d_model, shape.n_layers, shape.n_heads, shape.ffn_dim) == (512, 8, 8, 1376)
    # Transformer blocks of the GaLore 60M shape: 8 x (4 d^2 + 3 d f) + norms.
    per_block = 4 * 512**2 + 3 * 512 * 1376 + 2 * 512
    assert count_parameters(Decoder(shape))["blocks"] == 8 * per_block + 512


def test_bfloat16_model_runs_and_returns_float32_loss(tiny: Decoder) -> None:
    model = tiny.to(torch.bfloat16)
    idx = torch.randint(0, 300, (2, 9))
    loss = model(idx[:, :-1], idx[:, 1:])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="tiny"):
        get_config("7b")
