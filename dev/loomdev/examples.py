"""(Re)generate the shared workflows in example_workflows/ from a running server's /object_info.

``python -m loomdev.examples`` starts a server, builds each workflow with :class:`GraphBuilder` (UI format, widget
values ordered exactly as the frontend expects), and writes the JSON files that are committed.
"""
from __future__ import annotations

import json
import logging

from .demo_loras import demo_sha256
from .fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from .paths import REPO
from .playground_loras import playground_sha256
from .server import ComfyServer, prepare_workspace
from .workflow import GraphBuilder

log = logging.getLogger(__name__)

EXAMPLES = REPO / "example_workflows"


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


def library_compose(info: dict) -> dict:
    """Each region's LoRA picked by Loom Library Search from a prompt (hits say why), then composed."""
    g = GraphBuilder(info)
    unet = g.add("UNETLoader", (40, 40), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("CLIPLoader", (40, 200), clip_name=CLIP_FILE, type="stable_diffusion")
    previous = None
    for i, (query, prompt, box) in enumerate((("red fox, crimson", "a red fox", (0.0, 0.0, 0.55, 1.0)),
                                              ("blue bird, cobalt", "a blue bird", (0.45, 0.0, 1.0, 1.0)))):
        search = g.add("LoomLibrarySearch", (400, 40 + 600 * i), title=f"Find a LoRA for region {i + 1}",
                       prompt=query, top_k=1, strength=1.0, rescan=False)
        region = g.add("LoomRegion", (900, 40 + 600 * i), title=f"Region {i + 1}", prompt=prompt,
                       x0=box[0], y0=box[1], x1=box[2], y1=box[3])
        g.nodes[search - 1]["size"] = [340, 400]
        g.nodes[region - 1]["size"] = [340, 540]
        g.connect(clip, 0, search, "clip")
        g.connect(search, 1, region, "adapters")
        if previous is not None:
            g.connect(previous, 0, region, "regions")
        previous = region
    compose_regions(g, unet, clip, previous, "a meadow at noon", "loom_library_compose")
    return g.workflow()


def clora(info: dict) -> dict:
    """CLoRA without drawn regions: the red and blue demo LoRAs each steered to its concept word, fused with
    attention masks; Loom CLoRA Masks shows the masks after sampling and feeds them to Loom Compose as regions."""
    g = GraphBuilder(info)
    unet = g.add("UNETLoader", (40, 40), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("CLIPLoader", (40, 200), clip_name=CLIP_FILE, type="stable_diffusion")
    base = "a red fox and a blue bird on a lawn"
    previous = None
    for i, (lora, prompt, concept) in enumerate(((RED, "loomred a red fox and a blue bird on a lawn", "fox"),
                                                 (BLUE, "a red fox and loomblue a blue bird on a lawn", "bird"))):
        stack = g.add("LoomLoraStack", (340, 40 + 420 * i), title=f"LoRA {i + 1}", rows=stack_rows(lora))
        item = g.add("LoomCLoraConcept", (720, 40 + 420 * i), title=f"Concept {i + 1}", prompt=prompt,
                     concept=concept)
        g.connect(unet, 0, stack, "model")
        g.connect(stack, 2, item, "adapters")
        if previous is not None:
            g.connect(previous, 0, item, "concepts")
        previous = item
    node = g.add("LoomCLora", (1080, 40), base_prompt=base, update_end_percent=0.5, iterations=1)
    g.connect(unet, 0, node, "model")
    g.connect(clip, 0, node, "clip")
    g.connect(previous, 0, node, "concepts")
    sample_and_save(g, node, clip, node, "loom_clora")
    sampler = next(n["id"] for n in g.nodes if n["type"] == "KSampler")
    masks = g.add("LoomCLoraMasks", (1080, 900))
    g.connect(node, 2, masks, "clora")
    g.connect(sampler, 0, masks, "samples")
    save_preview = g.add("SaveImage", (1440, 900), filename_prefix="loom_clora_masks")
    g.connect(masks, 1, save_preview, "images")
    compose = g.add("LoomCompose", (1080, 1300), global_prompt=base, rules_end_percent=0.5, latent_reinit=False)
    g.connect(unet, 0, compose, "model")
    g.connect(clip, 0, compose, "clip")
    g.connect(masks, 2, compose, "regions")
    sample_and_save(g, compose, clip, compose, "loom_clora_regions", x=2400)
    return g.workflow()


def gated_stack(info: dict) -> dict:
    """A gated stack: the red demo LoRA shapes the first half of sampling and the blue one the second half
    (Loom Gate Schedule keyframes, applied inside the layers by Loom LoRA Stack without re-patching)."""
    g = GraphBuilder(info)
    unet = g.add("UNETLoader", (40, 40), unet_name=FLUX_FILE, weight_dtype="default")
    clip = g.add("CLIPLoader", (40, 200), clip_name=CLIP_FILE, type="stable_diffusion")
    red = g.add("LoomGateSchedule", (40, 400), title="Red: structure (first half)", lora=RED,
                keyframes="0:1, 0.5:0", interpolation="cosine", preview_steps=8)
    blue = g.add("LoomGateSchedule", (40, 760), title="Blue: details (second half)", lora=BLUE,
                 keyframes="0:0, 0.5:1", interpolation="cosine", preview_steps=8)
    rows = json.dumps([{"lora": name, "on": True, "strength": 1.0, "sha256": demo_sha256(name)} for name in (RED, BLUE)],
                      indent=1)
    stack = g.add("LoomLoraStack", (460, 40), title="Gated LoRA stack", rows=rows)
    g.nodes[stack - 1]["size"] = [440, 300]
    pos = g.add("CLIPTextEncode", (960, 40), text="loomred loomblue a red fox and a blue bird")
    g.connect(red, 0, blue, "gates")
    g.connect(blue, 0, stack, "gates")
    g.connect(unet, 0, stack, "model")
    g.connect(clip, 0, stack, "clip")
    g.connect(stack, 1, pos, "clip")
    sample_and_save(g, stack, clip, pos, "loom_gated_stack", x=1680)
    return g.workflow()


# The default run (``make run``): two concept LoRAs of the playground world, each in its own half.
PLAYGROUND_REGIONS = (("playground_ring.safetensors", "a blue ring on the left", (0.0, 0.0, 0.5, 1.0)),
                      ("playground_stripes.safetensors", "a yellow striped triangle on the right", (0.5, 0.0, 1.0, 1.0)))
PLAYGROUND_PROMPT = "a blue ring on the left and a yellow striped triangle on the right"
PLAYGROUND_SEED = 3


def playground(info: dict) -> dict:
    """The playground Flux trained in this repository composing two concept LoRAs it never merged (the ring
    shape on the left, the striped texture on the right) with Loom Compose; the 64x64 result is saved 4x
    enlarged (nearest) beside a preview of the regions."""
    g = GraphBuilder(info)
    base = g.add("LoomPlaygroundModel", (40, 40), title="Loom Playground Model")
    previous = region_chain(g, base, tuple((stack_rows(lora, sha256=playground_sha256(lora)), prompt, box)
                                           for lora, prompt, box in PLAYGROUND_REGIONS), "Concept LoRA for region")
    compose = g.add("LoomCompose", (1300, 40), global_prompt=PLAYGROUND_PROMPT)
    g.nodes[compose - 1]["size"] = [340, 600]
    neg = g.add("CLIPTextEncode", (1300, 700), text="")
    latent = g.add("LoomPlaygroundLatent", (1300, 920), width=64, height=64, batch_size=1)
    sampler = g.add("KSampler", (1700, 40), seed=PLAYGROUND_SEED, steps=20,
                    cfg=3.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    decode = g.add("LoomPlaygroundDecode", (2060, 40))
    enlarge = g.add("ImageScaleBy", (2060, 200), upscale_method="nearest-exact", scale_by=4.0)
    save = g.add("SaveImage", (2400, 40), filename_prefix="loom_playground")
    preview = g.add("LoomRegionPreview", (2060, 700), width=256, height=256)
    save_preview = g.add("SaveImage", (2400, 700), filename_prefix="loom_playground_regions")
    for src, slot, dst, name in ((base, 0, compose, "model"), (base, 1, compose, "clip"),
                                 (previous, 0, compose, "regions"), (base, 1, neg, "clip"),
                                 (compose, 0, sampler, "model"), (compose, 1, sampler, "positive"),
                                 (neg, 0, sampler, "negative"), (latent, 0, sampler, "latent_image"),
                                 (sampler, 0, decode, "samples"), (decode, 0, enlarge, "image"),
                                 (enlarge, 0, save, "images"), (previous, 0, preview, "regions"),
                                 (preview, 0, save_preview, "images")):
        g.connect(src, slot, dst, name)
    return g.workflow()


BUILDERS = {"loom_playground.json": playground, "loom_demo.json": demo, "loom_two_regions.json": two_regions,
            "loom_library_compose.json": library_compose,
            "loom_gated_stack.json": gated_stack, "loom_clora.json": clora}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[loom examples] %(message)s")
    with ComfyServer(prepare_workspace()) as server:
        info = server.get_json("/object_info")
        EXAMPLES.mkdir(exist_ok=True)
        for name, build in BUILDERS.items():
            (EXAMPLES / name).write_text(json.dumps(build(info), indent=1) + "\n")
            log.info("wrote %s", EXAMPLES / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
