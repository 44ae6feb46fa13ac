"""Workflows on the demo Flux (random weights, hidden 3072) that the browser and server tests drive: the stack on a
text-to-image graph, and two regions composed. They were the first examples; the shared examples now run on the
playground world (dev/loomdev/examples.py), these stay as test fixtures for the demo LoRAs."""
from __future__ import annotations

import json

from loomdev.demo_loras import demo_sha256
from loomdev.fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from loomdev.workflow import GraphBuilder


def demo(info: dict) -> dict:
    """The demo text-to-image graph on the demo Flux, with a Loom LoRA Stack between loader and sampler."""
    g = GraphBuilder(info)
    unet = g.add("UNETLoader", (40, 40), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("CLIPLoader", (40, 200), clip_name=CLIP_FILE, type="stable_diffusion")
    stack = g.add("LoomLoraStack", (400, 40), title="Loom LoRA Stack")
    pos = g.add("CLIPTextEncode", (760, 40), text="a red circle and a blue square on a white background")
    neg = g.add("CLIPTextEncode", (760, 260), text="")
    latent = g.add("EmptySD3LatentImage", (760, 460), width=128, height=128, batch_size=1)
    sampler = g.add("KSampler", (1120, 40), seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                    denoise=1.0)
    vae = g.add("VAELoader", (1120, 420), vae_name=VAE_FILE)
    decode = g.add("VAEDecode", (1480, 40))
    save = g.add("SaveImage", (1720, 40), filename_prefix="loom_demo")
    g.connect(unet, 0, stack, "model")
    g.connect(clip, 0, stack, "clip")
    g.connect(stack, 1, pos, "clip")
    g.connect(stack, 1, neg, "clip")
    g.connect(stack, 0, sampler, "model")
    g.connect(pos, 0, sampler, "positive")
    g.connect(neg, 0, sampler, "negative")
    g.connect(latent, 0, sampler, "latent_image")
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(decode, 0, save, "images")
    return g.workflow()


RED, BLUE = "loom_demo_red.safetensors", "loom_demo_blue.safetensors"


def stack_rows(lora: str, strength: float = 1.0, sha256: str | None = None) -> str:
    """A Loom LoRA Stack's rows JSON with one LoRA pinned to its sha256 (as the stack editor writes it); the
    demo LoRA's hash unless ``sha256`` is given."""
    pinned = sha256 or demo_sha256(lora)
    return json.dumps([{"lora": lora, "on": True, "strength": strength, "sha256": pinned}], indent=1)


def region_chain(g: GraphBuilder, model: int, regions: tuple, title: str = "LoRA for region") -> int:
    """One Loom LoRA Stack (``rows`` JSON) feeding one Loom Region (``prompt``, ``box``) per item of ``regions``,
    the regions chained in order; returns the last Loom Region."""
    previous = None
    for i, (rows, prompt, box) in enumerate(regions):
        stack = g.add("LoomLoraStack", (400, 40 + 600 * i), title=f"{title} {i + 1}", rows=rows)
        region = g.add("LoomRegion", (900, 40 + 600 * i), title=f"Region {i + 1}", prompt=prompt,
                       x0=box[0], y0=box[1], x1=box[2], y1=box[3])
        g.nodes[stack - 1]["size"] = [440, 260]
        g.nodes[region - 1]["size"] = [340, 540]
        g.connect(model, 0, stack, "model")
        g.connect(stack, 2, region, "adapters")
        if previous is not None:
            g.connect(previous, 0, region, "regions")
        previous = region
    return previous


def sample_and_save(g: GraphBuilder, model: int, clip: int, positive: int, prefix: str, x: float = 2020,
                    width: int = 128, height: int = 128) -> int:
    """Empty latent, KSampler (4 steps, cfg 1), VAE decode and save; returns the latent node."""
    neg = g.add("CLIPTextEncode", (x - 360, 700), text="")
    latent = g.add("EmptySD3LatentImage", (x - 360, 920), width=width, height=height, batch_size=1)
    sampler = g.add("KSampler", (x, 40), seed=7, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
                    denoise=1.0)
    vae = g.add("VAELoader", (x, 420), vae_name=VAE_FILE)
    decode = g.add("VAEDecode", (x + 360, 40))
    save = g.add("SaveImage", (x + 700, 40), filename_prefix=prefix)
    g.connect(clip, 0, neg, "clip")
    g.connect(model, 0, sampler, "model")
    g.connect(positive, 1 if g.nodes[positive - 1]["type"] in ("LoomCompose", "LoomCLora") else 0, sampler,
              "positive")
    g.connect(neg, 0, sampler, "negative")
    g.connect(latent, 0, sampler, "latent_image")
    g.connect(sampler, 0, decode, "samples")
    g.connect(vae, 0, decode, "vae")
    g.connect(decode, 0, save, "images")
    return latent


def compose_regions(g: GraphBuilder, unet: int, clip: int, regions: int, prompt: str, prefix: str) -> int:
    """Loom Compose over ``regions``, sampled and saved, plus a Loom Region Preview image; returns Compose."""
    compose = g.add("LoomCompose", (1300, 40), global_prompt=prompt, rules_end_percent=0.5)
    g.nodes[compose - 1]["size"] = [340, 600]
    g.connect(unet, 0, compose, "model")
    g.connect(clip, 0, compose, "clip")
    g.connect(regions, 0, compose, "regions")
    sample_and_save(g, compose, clip, compose, prefix)
    preview = g.add("LoomRegionPreview", (2380, 700), width=128, height=128)
    save_preview = g.add("SaveImage", (2720, 700), filename_prefix=prefix + "_regions")
    g.connect(regions, 0, preview, "regions")
    g.connect(preview, 0, save_preview, "images")
    return compose


def two_regions(info: dict) -> dict:
    """Two boxes side by side, each with its own prompt and demo LoRA (loaded by a Loom LoRA Stack, not
    merged), composed in one pass by Loom Compose."""
    g = GraphBuilder(info)
    unet = g.add("UNETLoader", (40, 40), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("CLIPLoader", (40, 200), clip_name=CLIP_FILE, type="stable_diffusion")
    previous = region_chain(g, unet, ((stack_rows(RED), "loomred a red fox", (0.0, 0.1, 0.5, 0.9)),
                                      (stack_rows(BLUE), "loomblue a blue bird", (0.5, 0.1, 1.0, 0.9))))
    compose_regions(g, unet, clip, previous, "a meadow at noon", "loom_two_regions")
    return g.workflow()
