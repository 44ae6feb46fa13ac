"""The benchmark's baselines predict what their definitions say, on a tiny Flux through ComfyUI's sampler, and the
regional fast path holds no L×L tensor (a memory probe); only Loom regional trims its region prompts to
``region_tokens`` — the peers sample them full length — and rows and FLOP limits count what each samples."""
from __future__ import annotations

from pathlib import Path

import comfy.samplers
import pytest
import torch
from comfy_models import tiny_flux
from lora_loom.bench import baselines
from lora_loom.bench.compose import random_adapters
from lora_loom.bench.flops import Workload, adapter_flops, base_flops
from lora_loom.bench.memory import measure_peak
from lora_loom.bench.perf import (
    PerfConfig,
    attention_pairs,
    flux_shape,
    run_cell,
    sample_steps,
)
from lora_loom.bench.report import format_table
from lora_loom.composition.comfy_bridge.merged import apply_merged

LATENT_HW = (16, 16)


@pytest.fixture(scope="module")
def patcher():
    return tiny_flux(seed=3)


def _scene(patcher, adapters: int, regions: int, region_tokens: int | None = None) -> baselines.Scene:
    cfg = patcher.model.model_config.unet_config
    entries = random_adapters(patcher, adapters, rank=4)
    return baselines.make_scene(entries, regions, 6, cfg["context_in_dim"], cfg["vec_in_dim"], seed=5,
                                region_tokens=region_tokens)


def denoised(setup: baselines.MethodSetup, hw: tuple[int, int] = LATENT_HW) -> torch.Tensor:
    """The model's x0 prediction ``[1, 16, H, W]`` at the first step of a 1-step euler run (cfg 1)."""
    guider = comfy.samplers.CFGGuider(setup.model)
    guider.set_conds(setup.positive, setup.positive)
    guider.set_cfg(1.0)
    sigmas = comfy.samplers.calculate_sigmas(setup.model.get_model_object("model_sampling"), "simple", 1)
    seen: list[torch.Tensor] = []
    noise = torch.randn(1, 16, *hw, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        guider.sample(noise, torch.zeros(1, 16, *hw), comfy.samplers.sampler_object("euler"), sigmas,
                      callback=lambda i, x0, x, total: seen.append(x0.clone()), disable_pbar=True, seed=7)
    return seen[0]


def _merged(patcher, entries, context, pooled) -> baselines.MethodSetup:
    return baselines.MethodSetup("merged", apply_merged(patcher, None, list(entries)).model,
                                 [[context, {"pooled_output": pooled, "guidance": 3.5}]], 1)


def test_hook_loras_with_masks_equal_merged_inside_each_mask(patcher, tmp_path: Path) -> None:
    """Inside each mask, merged with that region's full-length (6-token) prompt: hooks do not trim, even in a scene
    where Loom regional keeps 2 tokens."""
    scene = _scene(patcher, adapters=2, regions=2, region_tokens=2)
    hooks = baselines.hooks_setup(patcher, scene, tmp_path, LATENT_HW)
    assert hooks.passes == 2 and all("hooks" in c[1] and "mask" in c[1] for c in hooks.positive)
    assert [int(c[0].shape[1]) for c in hooks.positive] == [6, 6]
    got = denoised(hooks)
    for k, box in enumerate(scene.boxes):
        want = denoised(_merged(patcher, scene.painters[k], scene.region_contexts[k], scene.pooled))
        inside = baselines.region_mask(box, *LATENT_HW)[0].bool()
        torch.testing.assert_close(got[..., inside], want[..., inside], rtol=1e-4, atol=1e-5)
    plain = denoised(baselines.base_setup(patcher, scene))
    assert not torch.allclose(got, plain, atol=1e-3)  # the LoRAs do act


def test_lora_composite_is_the_mean_of_single_lora_passes(patcher, tmp_path: Path) -> None:
    scene = _scene(patcher, adapters=3, regions=1)
    composite = baselines.composite_setup(patcher, scene, tmp_path)
    assert composite.passes == 3
    singles = []
    for entry in scene.painters[0]:
        full = type(entry)(type(entry.row)(lora=entry.row.lora, strength=1.0), entry.adapter_set, entry.path)
        singles.append(denoised(_merged(patcher, [full], scene.global_context, scene.pooled)))
    torch.testing.assert_close(denoised(composite), torch.stack(singles).mean(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("regions", [2, 3])
def test_dense_per_head_equals_grouped_regional(patcher, regions: int) -> None:
    """dense_per_head models a peer: it composes the full-length region prompts (6 + regions·6 text tokens), so it
    equals the grouped path over the same untrimmed prompts, not Loom's trimmed pass (6 + regions·2)."""
    scene = _scene(patcher, adapters=3, regions=regions, region_tokens=2)
    dense = baselines.dense_per_head_setup(patcher, scene)
    assert int(dense.positive[0][0].shape[1]) == 6 + regions * 6
    assert int(baselines.regional_setup(patcher, scene).positive[0][0].shape[1]) == 6 + regions * 2
    grouped = baselines.regional_setup(patcher, scene, trimmed=False)
    torch.testing.assert_close(denoised(dense), denoised(grouped), rtol=1e-4, atol=1e-5)
    override = dense.model.model_options["transformer_options"]["optimized_attention_override"].previous
    assert isinstance(override, baselines.PerHeadMaskAttention) and override.calls > 0


def test_regional_fast_path_memory_grows_linearly_without_lxl(patcher) -> None:
    """Extra peak of the grouped regional step over the merged step, at 4× the image tokens: about 3.8× (linear),
    and far below one per-head L×L float tensor; the dense per-head baseline holds at least one."""
    scene = _scene(patcher, adapters=2, regions=2)
    heads = patcher.model.model_config.unet_config["num_heads"]
    extra, dense_extra, lengths = [], [], []
    for hw in ((32, 32), (64, 64)):
        latent = torch.zeros(1, 16, *hw)
        peak = {name: measure_peak(lambda s=setup, x=latent: sample_steps(s, x, 2), "cpu").peak_bytes
                for name, setup in (("merged", baselines.merged_setup(patcher, scene)),
                                    ("regional", baselines.regional_setup(patcher, scene)),
                                    ("dense", baselines.dense_per_head_setup(patcher, scene)))}
        length = hw[0] * hw[1] // 4 + 3 * 6
        lengths.append(length)
        extra.append(peak["regional"] - peak["merged"])
        dense_extra.append(peak["dense"] - peak["merged"])
        per_head_lxl = heads * length * length * 4
        assert dense_extra[-1] >= per_head_lxl
    seen = f"L {lengths}: regional extra {extra} B, dense extra {dense_extra} B, per-head LxL {per_head_lxl} B"
    assert extra[-1] < per_head_lxl / 2, seen
    assert 0 < extra[1] < extra[0] * (lengths[1] / lengths[0]) * 1.5, seen  # measured: 3.6x for 3.8x the tokens
    assert dense_extra[1] > dense_extra[0] * (lengths[1] / lengths[0]) * 2, seen  # measured: 11.8x


def test_gates_without_schedules_equal_merged(patcher) -> None:
    """The gated stack with no gate schedule applies every row per token at its strength: the merged prediction."""
    scene = _scene(patcher, adapters=3, regions=1)
    gates = baselines.gates_setup(patcher, scene)
    assert gates.passes == 1
    torch.testing.assert_close(denoised(gates), denoised(baselines.merged_setup(patcher, scene)), rtol=1e-4, atol=1e-5)


def test_clora_runs_one_plus_n_passes(patcher) -> None:
    """Global prompt and each adapter's region prompt full length (6 tokens; CLoRA does not trim), concept token
    1 + i in each."""
    scene = _scene(patcher, adapters=2, regions=2, region_tokens=2)
    clora = baselines.clora_setup(patcher, scene)
    assert clora.passes == 3
    assert [(int(p.context.shape[1]), p.concepts) for p in clora.composition.prompts] == [
        (6, {0: (1,), 1: (2,)}), (6, {0: (1,)}), (6, {1: (2,)})]
    got = denoised(clora)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, denoised(baselines.base_setup(patcher, scene)), atol=1e-3)


def test_scene_and_rows_follow_region_tokens(patcher, tmp_path: Path) -> None:
    """Every prompt 6 tokens; Loom regional keeps 2 of each of its 3 region prompts (a prefix, as trimming after the
    end token does): its pass reads 6 + 3·2 = 12 text tokens. The peers do not trim: a hook pass reads one 6-token
    region prompt, dense_per_head 6 + 3·6 = 24, CLoRA's passes 6 each. The rows (128² -> 8×8 = 64 image tokens) and
    their FLOP limits count the same."""
    cfg = patcher.model.model_config.unet_config
    dim = cfg["context_in_dim"]
    entries = random_adapters(patcher, 3, rank=4)
    scene = baselines.make_scene(entries, 3, 6, dim, cfg["vec_in_dim"], seed=5, region_tokens=2)
    assert scene.global_context.shape == (1, 6, dim) and scene.region_tokens == 2
    assert [tuple(c.shape) for c in scene.region_contexts] == [(1, 6, dim)] * 3
    assert [tuple(c.shape) for c in scene.trimmed_region_contexts] == [(1, 2, dim)] * 3
    for full, trimmed in zip(scene.region_contexts, scene.trimmed_region_contexts):
        torch.testing.assert_close(trimmed, full[:, :2])
    untrimmed = baselines.make_scene(entries, 3, 6, dim, cfg["vec_in_dim"], seed=5)
    assert untrimmed.trimmed_region_contexts is untrimmed.region_contexts
    for bad in (0, 7):
        with pytest.raises(baselines.BaselineError, match="region_tokens"):
            baselines.make_scene(entries, 3, 6, dim, cfg["vec_in_dim"], region_tokens=bad)

    methods = ("merged", "regional", "hooks", "dense_per_head", "clora")
    config = PerfConfig(prompt_tokens=6, region_tokens=2, rank=4, steps=2, repeats=1, methods=methods,
                        memory=False).validate()
    assert config.region_length == 2
    assert PerfConfig(prompt_tokens=6, region_tokens=0).region_length == 6
    assert PerfConfig(prompt_tokens=6, region_tokens=12).region_length == 6
    rows = {r.method: r for r in run_cell(patcher, config, 128, 3, 3, tmp_path)}
    assert {m: (r.image_tokens, r.text_tokens, r.passes) for m, r in rows.items()} == {
        "merged": (64, 6, 1), "regional": (64, 12, 1), "hooks": (64, 6, 3), "dense_per_head": (64, 24, 1),
        "clora": (64, 6, 4)}
    table = format_table(list(rows.values()))
    assert all(f"64+{n}" in table for n in (6, 12, 24))
    shape = flux_shape(patcher)
    merged = base_flops(shape, Workload(64, 6)).total
    pairs, base = attention_pairs(baselines.regional_setup(patcher, scene), 64)
    assert rows["regional"].limit == pytest.approx(
        (base_flops(shape, Workload(64, 12), pairs + base).total + adapter_flops(shape, Workload(64, 12), 3, 4))
        / merged)
    assert rows["hooks"].limit == pytest.approx(3.0)
    assert rows["dense_per_head"].limit == pytest.approx(
        (base_flops(shape, Workload(64, 24), 2 * 88 ** 2).total + adapter_flops(shape, Workload(64, 24), 3, 4))
        / merged)
    assert rows["clora"].limit == pytest.approx(4.0 + adapter_flops(shape, Workload(64, 6), 3, 4) / merged)
