"""Cross-check of our reading of PEFT-saved Flux LoRAs against the real PEFT library (not part of the test suite:
the pack does not depend on peft). A toy module with diffusers' Flux names (to_q/k/v, to_out.0, proj_mlp,
proj_out) gets PEFT LoRA / DoRA / rslora / alpha- and rank-pattern adapters; its ``get_peft_model_state_dict`` is
saved the way diffusers does (``transformer.`` prefix, ``lora_adapter_metadata``), read by ``read_adapter_set``
onto the fused Flux weights (img_attn.qkv, linear1 slices), and compared with PEFT's own ``merge_and_unload``.

    .loom/venv/bin/python -m pip install --no-deps --target /tmp/peftlib peft accelerate
    PEFTLIB=/tmp/peftlib .loom/venv/bin/python dev/crosscheck_peft.py
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ.get("PEFTLIB", "/tmp/peftlib"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import conftest  # noqa: F401,E402  loads the pack as lora_loom
import torch  # noqa: E402
from lora_loom.composition.adapters import merged_delta  # noqa: E402
from lora_loom.composition.formats import read_adapter_set  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402
from torch import nn  # noqa: E402

H, M = 16, 64
torch.manual_seed(0)



class Attn(nn.Module):
    def __init__(self, single=False):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(H, H, bias=False) for _ in range(3))
        if not single:
            self.to_out = nn.ModuleList([nn.Linear(H, H, bias=False)])



class Double(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn()


class Single(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attn(single=True)
        self.proj_mlp = nn.Linear(H, M, bias=False)
        self.proj_out = nn.Linear(H + M, H, bias=False)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Double()])
        self.single_transformer_blocks = nn.ModuleList([Single()])
    def forward(self, x):
        return x


def run(config_kwargs, label):
    base = Toy()
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(**config_kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    sd = get_peft_model_state_dict(model)
    file_sd = {"transformer." + k.removeprefix("base_model.model."): v.detach().clone() for k, v in sd.items()}
    cfg = model.peft_config["default"].to_dict()
    kept = ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora", "use_dora")
    meta = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": (list(v) if isinstance(v, set) else v)
                                                  for k, v in cfg.items() if k in kept})}
    merged = model.merge_and_unload()
    after = merged.state_dict()
    peft_delta = {k: after[k] - original[k] for k in original}
    adapter_set = read_adapter_set(file_sd, f"{label}.safetensors", meta)
    assert adapter_set.leftovers == (), adapter_set.leftovers
    # fused targets of our reading
    fused_base = {"double_blocks.0.img_attn.qkv":
                  torch.cat([original[f"transformer_blocks.0.attn.to_{s}.weight"] for s in "qkv"]),
                  "single_blocks.0.linear1":
                  torch.cat([original[f"single_transformer_blocks.0.attn.to_{s}.weight"] for s in "qkv"]
                            + [original["single_transformer_blocks.0.proj_mlp.weight"]]),
                  "double_blocks.0.img_attn.proj": original["transformer_blocks.0.attn.to_out.0.weight"],
                  "single_blocks.0.linear2": original["single_transformer_blocks.0.proj_out.weight"]}
    fused_peft = {"double_blocks.0.img_attn.qkv":
                  torch.cat([peft_delta[f"transformer_blocks.0.attn.to_{s}.weight"] for s in "qkv"]),
                  "single_blocks.0.linear1":
                  torch.cat([peft_delta[f"single_transformer_blocks.0.attn.to_{s}.weight"] for s in "qkv"]
                            + [peft_delta["single_transformer_blocks.0.proj_mlp.weight"]]),
                  "double_blocks.0.img_attn.proj": peft_delta["transformer_blocks.0.attn.to_out.0.weight"],
                  "single_blocks.0.linear2": peft_delta["single_transformer_blocks.0.proj_out.weight"]}
    worst = 0.0
    for module, adapters in adapter_set.adapters.items():
        ours = merged_delta(adapters, tuple(adapters[0].target_shape), fused_base[module])
        want = fused_peft[module]
        err = float((ours - want).norm() / want.norm())
        worst = max(worst, err)
    WORST.append(worst)
    print(f"{label:34s} modules {len(adapter_set.adapters)}  kinds {adapter_set.kinds()}  max rel err {worst:.2e}"
          f"  notes {adapter_set.notes}")

WORST: list[float] = []
targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]
run(dict(r=4, lora_alpha=8, target_modules=targets), "lora alpha 8 r 4")
run(dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True), "dora alpha 8 r 4")
run(dict(r=4, lora_alpha=8, target_modules=targets, use_rslora=True), "rslora alpha 8 r 4")
run(dict(r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"single_transformer_blocks.0.attn.to_k": 32},
         rank_pattern={"to_out.0": 2, "proj_mlp": 8}), "alpha/rank patterns")
run(dict(r=4, lora_alpha=16, target_modules=targets, use_dora=True, rank_pattern={"to_v": 2}), "dora + rank pattern")
import peft  # noqa: E402

print(f"peft {peft.__version__}: worst relative error {max(WORST):.2e}")
sys.exit(0 if max(WORST) < 1e-5 else 1)
