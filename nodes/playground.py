"""Playground nodes: the tiny Flux trained in this repository (``playground/``), with its latent and decoder.

``Loom Playground Model`` gives a MODEL and a CLIP that work with stock CLIPTextEncode, KSampler and
SamplerCustomAdvanced; ``Loom Playground Latent`` makes the empty 48-channel latent; ``Loom Playground Decode``
and ``Loom Playground Encode`` convert between latents and images exactly (no VAE).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..playground import latent
from ..playground.model import load_playground
from .checks import LoomNode

MAX_SIZE = 512


class LoomPlaygroundModel(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomPlaygroundModel",
            display_name="Loom Playground Model",
            category="loom/playground",
            description="The playground Flux trained in this pack on drawn shapes (64x64), and its word-level text "
                        "encoder as CLIP. Words: a, and, on, in, the, left, right, center, red, green, blue, "
                        "yellow, circle, square, triangle, star, ring, solid, checkered, striped.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"), io.Clip.Output(display_name="CLIP")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        loaded = load_playground()
        return io.NodeOutput(loaded.patcher, loaded.clip)


class LoomPlaygroundLatent(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomPlaygroundLatent",
            display_name="Loom Playground Latent",
            category="loom/playground",
            description="An empty latent for the playground model (48 channels, a quarter of the image size).",
            inputs=[
                io.Int.Input("width", default=64, min=16, max=MAX_SIZE, step=16, tooltip="image width in pixels"),
                io.Int.Input("height", default=64, min=16, max=MAX_SIZE, step=16, tooltip="image height in pixels"),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="how many images at once"),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, width: int, height: int, batch_size: int) -> io.NodeOutput:
        return io.NodeOutput({"samples": latent.empty(batch_size, width, height)})


class LoomPlaygroundDecode(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomPlaygroundDecode",
            display_name="Loom Playground Decode",
            category="loom/playground",
            description="Playground latent -> image, exactly (the playground latent is a pixel rearrangement).",
            inputs=[io.Latent.Input("samples", tooltip="the sampler's output")],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        return io.NodeOutput(latent.decode(samples["samples"]))


class LoomPlaygroundEncode(LoomNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoomPlaygroundEncode",
            display_name="Loom Playground Encode",
            category="loom/playground",
            description="Image -> playground latent, exactly (sides must be multiples of 4).",
            inputs=[io.Image.Input("pixels", tooltip="the image to turn into a playground latent")],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, pixels: torch.Tensor) -> io.NodeOutput:
        return io.NodeOutput({"samples": latent.encode(pixels[..., :3].float())})


NODES = [LoomPlaygroundModel, LoomPlaygroundLatent, LoomPlaygroundDecode, LoomPlaygroundEncode]
