"""The playground world: a tiny Flux trained in this repository on drawn shapes, concept LoRAs on top, and an
exact detector. ``world``, ``detector``, ``text`` and ``latent`` are pure (torch/numpy); ``model`` and ``train``
import ComfyUI."""
