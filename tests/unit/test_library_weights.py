"""Weight side of the library: factor reading, training-free signatures, the AutoLoRA weight encoder,
and retrieval quality on a generated library whose weights carry known concepts."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import library_factory as factory  # tests/ is on sys.path (tests/conftest.py)
import numpy as np
import pytest
import torch
from lora_loom.retrieval.factors import FluxLayout, LowRankFactors, read_factors, scaled
from lora_loom.retrieval.library import Library
from lora_loom.retrieval.text_encoders import HashedTextEncoder
from lora_loom.retrieval.weight_encoder import (
    WeightEncoder,
    WeightEncoderConfig,
    load_weight_encoder,
    save_weight_encoder,
    train_weight_encoder,
)
from lora_loom.retrieval.weight_signature import (
    SignatureConfig,
    singular_values,
    weight_signature,
)
from lora_loom.retrieval.weight_vectors import SignatureSpace

LAYOUT = FluxLayout(hidden=32, mlp_ratio=4.0, double_blocks=2, single_blocks=2)
LAYERS = [(s.name, s.d_in, s.d_out) for s in LAYOUT.layers]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls on 2 shared cores run far faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_layout_counts_and_dims() -> None:
    flux = FluxLayout()
    assert len(flux.layers) == 19 * 10 + 38 * 3
    assert flux.layers[0].name == "double_blocks.0.img_attn.qkv"
    assert flux.layers[-1].name == "single_blocks.37.modulation.lin"
    assert flux.kinds["linear1"] == (3072, 3 * 3072 + 4 * 3072) and flux.kinds["linear2"] == (5 * 3072, 3072)


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_read_factors_key_spellings(tmp_path: Path, style: str) -> None:
    made = factory.concept_library(tmp_path, LAYERS[:3], concepts=1, per_concept=1, rank=3, style=style)
    factors = read_factors(made[0].path)
    assert set(factors) <= {name for name, _, _ in LAYERS[:3]} and factors
    for name, item in factors.items():
        spec = LAYOUT.layers[LAYOUT.index[name]]
        assert (item.up.shape[0], item.down.shape[1], item.scale) == (spec.d_out, spec.d_in, 1.0)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_singular_values_match_dense_svd(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    factors = LowRankFactors(up=torch.randn(48, rank, generator=gen), down=torch.randn(rank, 20, generator=gen),
                             scale=0.5)
    dense = torch.linalg.svdvals(factors.up @ factors.down * 0.5)[:4]
    assert torch.allclose(singular_values(factors, 4)[:min(4, rank)], dense[:min(4, rank)], rtol=1e-4)
    assert torch.all(singular_values(factors, 4)[rank:] == 0)


def test_signature_is_invariant_to_factorisation_and_strength() -> None:
    gen = torch.Generator().manual_seed(0)
    spec = LAYOUT.layers[5]
    up, down = torch.randn(spec.d_out, 4, generator=gen), torch.randn(4, spec.d_in, generator=gen)
    mix = torch.randn(4, 4, generator=gen) + 3 * torch.eye(4)
    original = {spec.name: LowRankFactors(up, down)}
    refactored = {spec.name: LowRankFactors(up @ mix, torch.linalg.solve(mix, down))}
    a, b = weight_signature(original, LAYOUT), weight_signature(refactored, LAYOUT)
    assert a.shape == (len(LAYOUT.layers) * SignatureConfig().per_layer,)
    assert float(a @ b) > 0.9999 and float(a @ weight_signature(scaled(original, 0.3), LAYOUT)) > 0.9999
    per_layer = SignatureConfig().per_layer
    blocks = a.reshape(-1)  # zero fill: only layer 5's entries (spectrum and sketch parts) are non-zero
    spectrum, sketch = blocks[: len(LAYOUT.layers) * 4].reshape(-1, 4), blocks[len(LAYOUT.layers) * 4:].reshape(-1, 8)
    assert np.flatnonzero(np.abs(spectrum).sum(1)).tolist() == [5]
    assert np.flatnonzero(np.abs(sketch).sum(1)).tolist() == [5]
    assert per_layer == 12 and not weight_signature({}, LAYOUT).any()


def test_signature_rejects_factors_of_the_wrong_shape() -> None:
    bad = {LAYOUT.layers[0].name: LowRankFactors(torch.randn(7, 2), torch.randn(2, 32))}
    with pytest.raises(ValueError, match="double_blocks.0.img_attn.qkv"):
        weight_signature(bad, LAYOUT)


def _recall_at_5(similarity: np.ndarray, concepts: np.ndarray, candidates_per_query: np.ndarray) -> float:
    """Mean fraction of a query's top 5 that share its concept, normalised by what is reachable."""
    scores = []
    for i, row in enumerate(similarity):
        top = np.argsort(-row, kind="stable")[:5]
        scores.append((concepts[top] == concepts[i]).sum() / min(5, candidates_per_query[i]))
    return float(np.mean(scores))


@pytest.mark.parametrize(("spectrum_weight", "floor"), [(0.0, 0.6), (0.3, 0.6)])
def test_weight_only_search_recovers_concepts(tmp_path: Path, spectrum_weight: float, floor: float) -> None:
    """Query = another LoRA of the same concept; 8 concepts × 6 LoRAs, heavy factor noise (3x the concept).

    Chance recall@5 is 5/47 ≈ 0.11 (5 of the 47 other files share the query's concept). Over 48 queries ×
    5 slots a chance ranker has a standard deviation of about 0.02, so a floor of 0.6 is > 20 σ above chance
    while leaving room below the measured 0.95 (sketch only) / 0.99 (default) for platform noise.
    """
    space = SignatureSpace(LAYOUT, SignatureConfig(spectrum_weight=spectrum_weight))
    made = factory.concept_library(tmp_path / "loras", LAYERS, concepts=8, per_concept=6, seed=1, noise=3.0)
    library = Library(tmp_path / "index.sqlite", [tmp_path / "loras"], weight_signatures=space)
    library.scan()
    assert library.stats().signature_vectors == len(made)
    concept_of = {m.relpath: m.concept for m in made}
    recalls = []
    for item in made:
        hits = library.search(like=item.relpath, top_k=5)
        assert item.relpath not in {h.relpath for h in hits}
        assert all(h.why.components[0].source == "like" for h in hits)
        recalls.append(sum(concept_of[h.relpath] == item.concept for h in hits) / 5)
    assert float(np.mean(recalls)) >= floor


def test_weight_encoder_shapes_and_missing_layers() -> None:
    encoder = WeightEncoder(WeightEncoderConfig(hidden=32, double_blocks=2, single_blocks=2, dim=16, heads=2))
    spec = LAYOUT.layers[3]
    one = {spec.name: LowRankFactors(torch.randn(spec.d_out, 2), torch.randn(2, spec.d_in))}
    tokens = encoder.tokens(encoder.pack([one, {}]))
    assert tokens.shape == (2, len(LAYOUT.layers), 16)
    assert tokens[0, 3].abs().sum() > 0 and tokens[0].abs().sum(-1).count_nonzero() == 1 and not tokens[1].any()
    out = encoder([one, {}])
    assert out.shape == (2, 16) and torch.allclose(out.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(encoder([scaled(one, 5.0)]), out[:1], atol=1e-5)  # strength does not matter


def test_trained_weight_encoder_retrieves_held_out_adapters_by_text(tmp_path: Path) -> None:
    """Train on 6 LoRAs per concept (captions name the concept), query held-out LoRAs (2 per concept) with
    the concept's text. Chance recall@5 is 5/16 ≈ 0.31 (2 relevant among 16 held-out files); the encoder
    measured 1.0, the floor 0.75 is > 4 σ above chance (σ ≈ 0.1 over 8 queries)."""
    torch.manual_seed(0)
    made = factory.concept_library(tmp_path / "loras", LAYERS, concepts=8, per_concept=8, seed=2, noise=3.0)
    factors = [read_factors(m.path) for m in made]
    held_out = [i for i, m in enumerate(made) if m.path.stem.endswith(("_06", "_07"))]
    train = [i for i in range(len(made)) if i not in held_out]
    text = HashedTextEncoder(dim=64)
    encoder = WeightEncoder(WeightEncoderConfig(hidden=32, double_blocks=2, single_blocks=2, dim=64,
                                                text_encoder=text.name))
    steps: list[int] = []
    report = train_weight_encoder(encoder, [factors[i] for i in train], text.encode([made[i].caption for i in train]),
                                  epochs=30, batch_size=16, progress=lambda step, total, loss: steps.append(step),
                                  checkpoint=str(tmp_path / "ckpt" / "encoder"))
    assert report.epoch_losses[-1] < 0.6 * report.epoch_losses[0] and steps[-1] == report.steps == 90
    with torch.no_grad():
        vectors = encoder([factors[i] for i in held_out]).numpy()
    concepts = np.array([made[i].concept for i in held_out])
    recall = []
    for concept in range(8):
        query = text.encode([f"a {factory.CONCEPT_WORDS[concept]} style lora"]).numpy()[0]
        top = np.argsort(-(vectors @ query))[:5]
        recall.append((concepts[top] == concept).sum() / 2)
    assert float(np.mean(recall)) >= 0.75

    reloaded = load_weight_encoder(tmp_path / "ckpt" / "encoder")
    assert reloaded.name == encoder.name
    with torch.no_grad():
        assert torch.allclose(reloaded([factors[0]]), encoder([factors[0]]), atol=1e-6)

    # the library uses it: prompt -> weight ranking over files without any caption of their concept
    library = Library(tmp_path / "index.sqlite", [tmp_path / "loras"], text_encoder=text, weight_encoder=reloaded)
    library.scan()
    hits = library.search("a watercolor style lora", top_k=len(made))
    by_weight = sorted((c.rank, h.relpath) for h in hits for c in h.why.components if c.source == "weight")
    assert [rank for rank, _ in by_weight[:5]] == [1, 2, 3, 4, 5]
    assert sum(relpath.startswith("concepts/c00_") for _, relpath in by_weight[:5]) >= 4


def test_weight_encoder_must_match_the_text_encoder(tmp_path: Path) -> None:
    encoder = WeightEncoder(WeightEncoderConfig(hidden=32, double_blocks=2, single_blocks=2, dim=64, text_encoder="x"))
    with pytest.raises(ValueError, match="text space"):
        Library(tmp_path / "i.sqlite", [tmp_path], text_encoder=HashedTextEncoder(64), weight_encoder=encoder)
    with pytest.raises(ValueError, match="lora-loom-weight-encoder-v1"):
        (tmp_path / "bad.json").write_text("{}")
        load_weight_encoder(tmp_path / "bad")
    save_weight_encoder(encoder, tmp_path / "ok")
    assert (tmp_path / "ok.safetensors").exists()
