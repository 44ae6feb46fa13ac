"""Joint attention kernels: grouped (mask-free) path == dense masked reference, mask cache, edge cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lora_loom.kernels import joint_attention as ja
from lora_loom.kernels.joint_attention import (
    AttentionRulesError,
    attention_dense,
    attention_grouped,
    attention_with_rules,
    dense_mask,
    grouped_layout,
    resolve_allowed,
)
from lora_loom.kernels.probes import attention_probabilities, text_to_image_maps

G = 5


def _pattern(name: str, generator: torch.Generator) -> torch.Tensor:
    """allowed [G, G] patterns: random, block-diagonal, everything, nothing (every row empty), one empty row."""
    if name == "random":
        return torch.rand(G, G, generator=generator) < 0.5
    if name == "diagonal":
        return torch.eye(G, dtype=torch.bool)
    if name == "all":
        return torch.ones(G, G, dtype=torch.bool)
    if name == "none":
        return torch.zeros(G, G, dtype=torch.bool)
    allowed = torch.rand(G, G, generator=generator) < 0.6
    allowed[2] = False
    return allowed


def _case(seed: int, pattern: str, dtype: torch.dtype, length: int = 37, missing_group: bool = False):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, G, (length,), generator=generator)
    if missing_group:
        labels[labels == 3] = 0
    q, k, v = (torch.randn(2, 3, length, 8, generator=generator) for _ in range(3))
    return labels, _pattern(pattern, generator), q.to(dtype), k.to(dtype), v.to(dtype)


PATTERNS = ["random", "diagonal", "all", "none", "empty_row"]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("missing_group", [False, True])
def test_grouped_equals_dense_fp32(seed: int, pattern: str, missing_group: bool) -> None:
    labels, allowed, q, k, v = _case(seed, pattern, torch.float32, missing_group=missing_group)
    dense = attention_dense(q, k, v, dense_mask(labels, allowed))
    grouped = attention_grouped(q, k, v, labels, allowed)
    assert grouped.shape == (2, 37, 3 * 8)
    torch.testing.assert_close(grouped, dense, atol=2e-6, rtol=1e-5)  # fp32: tight


@pytest.mark.parametrize("pattern", PATTERNS)
def test_grouped_equals_dense_bf16(pattern: str) -> None:
    labels, allowed, q, k, v = _case(5, pattern, torch.bfloat16)
    reference = attention_dense(q.float(), k.float(), v.float(), dense_mask(labels, allowed))
    grouped = attention_grouped(q, k, v, labels, allowed)
    assert grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped.float(), reference, atol=3e-2, rtol=2e-2)  # bf16: loose


def test_output_layout_matches_comfy_skip_reshape() -> None:
    """With all keys allowed both paths equal ComfyUI's SDPA + transpose(1, 2).reshape(B, L, H*D)."""
    labels, allowed, q, k, v = _case(3, "all", torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 37, 24)
    torch.testing.assert_close(attention_grouped(q, k, v, labels, allowed), expected)
    torch.testing.assert_close(attention_dense(q, k, v, None), expected)


def test_group_without_keys_attends_to_itself() -> None:
    labels, allowed, q, k, v = _case(4, "empty_row", torch.float32)
    own = (labels == 2).nonzero().flatten()
    alone = F.scaled_dot_product_attention(q[:, :, own], k[:, :, own], v[:, :, own])
    grouped = attention_grouped(q, k, v, labels, allowed).reshape(2, 37, 3, 8)
    torch.testing.assert_close(grouped[:, own], alone.transpose(1, 2), atol=2e-6, rtol=1e-5)
    assert resolve_allowed(labels, allowed)[2].tolist() == [False, False, True, False, False]


def test_grouped_never_builds_a_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SDPA call of the grouped path is mask-free and sees only its allowed keys."""
    labels, allowed, q, k, v = _case(6, "diagonal", torch.float32, length=40)
    calls: list[tuple[int, int]] = []
    real = F.scaled_dot_product_attention

    def spy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: object) -> torch.Tensor:
        assert kwargs.get("attn_mask") is None
        calls.append((query.shape[2], key.shape[2]))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(ja.F, "scaled_dot_product_attention", spy)
    ja.clear_caches()
    attention_grouped(q, k, v, labels, allowed)
    counts = torch.bincount(labels, minlength=G)
    assert sorted(calls) == sorted((int(c), int(c)) for c in counts if c > 0)


def test_rows_with_equal_key_sets_share_one_block() -> None:
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    allowed = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    layout = grouped_layout(labels, allowed)
    assert sorted(b.query_index.tolist() for b in layout.blocks) == [[0, 1, 3, 4], [2, 5]]


def test_dense_mask_is_broadcast_bool_and_cached() -> None:
    labels, allowed, *_ = _case(7, "random", torch.float32)
    ja.clear_caches()
    mask = dense_mask(labels, allowed)
    assert mask.shape == (1, 1, 37, 37) and mask.dtype == torch.bool
    assert dense_mask(labels.clone(), allowed.clone()) is mask  # same rules, same length: cached
    other = allowed.clone()
    other[0, 0] = ~other[0, 0]
    assert dense_mask(labels, other) is not mask
    effective = resolve_allowed(labels, allowed)
    assert torch.equal(mask[0, 0], effective[labels[:, None], labels[None, :]])


@pytest.mark.parametrize("mask_kind", ["bool2d", "bool3d", "additive4d"])
def test_attention_with_rules_combines_comfy_mask(mask_kind: str) -> None:
    labels, allowed, q, k, v = _case(8, "random", torch.float32)
    generator = torch.Generator().manual_seed(9)
    extra = torch.rand(37, 37, generator=generator) < 0.8
    extra |= torch.eye(37, dtype=torch.bool)
    rules = dense_mask(labels, allowed)
    keep = rules[0, 0] & extra
    keep |= ~keep.any(dim=1, keepdim=True) & torch.eye(37, dtype=torch.bool)
    mask = {"bool2d": extra, "bool3d": extra[None].expand(2, 37, 37),
            "additive4d": torch.zeros(1, 1, 37, 37).masked_fill(~extra, float("-inf"))}[mask_kind]
    got = attention_with_rules(q, k, v, labels, allowed, mask=mask)
    expected = attention_dense(q, k, v, keep)
    finite = torch.isfinite(expected).all(dim=-1)
    torch.testing.assert_close(got[finite], expected[finite], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(attention_with_rules(q, k, v, labels, allowed),
                               attention_dense(q, k, v, rules), atol=2e-6, rtol=1e-5)


def test_gradients_match_dense() -> None:
    labels, allowed, q, k, v = _case(10, "random", torch.float32)
    grads = []
    for path in ("dense", "grouped"):
        qq = q.clone().requires_grad_(True)
        out = attention_dense(qq, k, v, dense_mask(labels, allowed)) if path == "dense" \
            else attention_grouped(qq, k, v, labels, allowed)
        out.square().sum().backward()
        grads.append(qq.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("labels, allowed, message", [
    (torch.tensor([0, 1, 5]), torch.ones(3, 3, dtype=torch.bool), "labels: values must lie in \\[0, 3\\)"),
    (torch.tensor([0.0, 1.0]), torch.ones(2, 2, dtype=torch.bool), "labels: expected int64"),
    (torch.tensor([0, 1]), torch.ones(2, 3, dtype=torch.bool), "allowed: expected bool \\[G, G\\]"),
    (torch.tensor([0, 1]), torch.ones(2, 2), "allowed: expected bool"),
])
def test_rule_errors(labels: torch.Tensor, allowed: torch.Tensor, message: str) -> None:
    with pytest.raises(AttentionRulesError, match=message):
        resolve_allowed(labels, allowed)


def test_length_mismatch_raises() -> None:
    labels, allowed, q, k, v = _case(11, "all", torch.float32)
    with pytest.raises(AttentionRulesError, match="labels: length 36"):
        attention_grouped(q, k, v, labels[:36], allowed)
    with pytest.raises(AttentionRulesError, match="q, k, v"):
        attention_grouped(q, k[:, :, :5], v, labels, allowed)


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("with_rules", [False, True])
def test_probe_probabilities_equal_masked_softmax(chunk: int, with_rules: bool) -> None:
    labels, allowed, q, k, _ = _case(12, "empty_row", torch.float32)
    logits = q @ k.transpose(-1, -2) / 8 ** 0.5
    if with_rules:
        logits = logits.masked_fill(~dense_mask(labels, allowed), float("-inf"))
    full = torch.softmax(logits, dim=-1)
    rows, cols = torch.tensor([3, 0, 36, 20]), torch.tensor([5, 1, 1, 30, 2])
    probe = attention_probabilities(q, k, rows, cols, chunk=chunk, labels=labels if with_rules else None,
                                    allowed=allowed if with_rules else None)
    torch.testing.assert_close(probe.probabilities, full[:, :, rows][..., cols], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probe.row_sums, torch.ones(2, 3, 4), atol=1e-5, rtol=0)


def test_text_to_image_maps_average_heads_and_keep_gradients() -> None:
    labels, allowed, q, k, _ = _case(13, "all", torch.float32, length=4 + 12)
    q.requires_grad_(True)
    text, image = torch.arange(4), torch.arange(4, 16)
    maps = text_to_image_maps(q, k, text, image, grid_h=3, grid_w=4, chunk=5)
    assert maps.shape == (2, 4, 3, 4)
    full = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    expected = full[:, :, 4:, :4].mean(dim=1).transpose(1, 2).reshape(2, 4, 3, 4)
    torch.testing.assert_close(maps, expected.detach(), atol=1e-6, rtol=1e-5)
    maps.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    with pytest.raises(AttentionRulesError, match="do not fill a 3x3 grid"):
        text_to_image_maps(q, k, text, image, grid_h=3, grid_w=3)
