"""(Re)generate the shared workflows in example_workflows/ from a running server's /object_info.

``python -m loomdev.examples`` starts a server, builds each workflow with :class:`GraphBuilder` (UI format, widget
values ordered exactly as the frontend expects), and writes the JSON files that are committed.
"""
from __future__ import annotations

import json
import logging

from .fixtures import CLIP_FILE, FLUX_FILE, VAE_FILE
from .paths import REPO
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


BUILDERS = {"loom_demo.json": demo}


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
