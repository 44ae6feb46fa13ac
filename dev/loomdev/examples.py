"""(Re)generate the shared workflows in example_workflows/ from a running server's /object_info.

``python -m loomdev.examples`` starts a server, builds each workflow with :class:`GraphBuilder` (UI format, widget
values ordered exactly as the frontend expects), lays it out (:func:`layout`: columns by depth, no overlap), adds a
note saying what it shows and a view that opens at a readable zoom, and writes the JSON files that are committed.
``python -m loomdev.thumbnails`` then runs each one and writes its thumbnail from the real output.

Every example runs on the playground world (``playground/``: a tiny Flux that draws shapes, with concept LoRAs),
so its output shows its point. The concept LoRAs are named here once (:data:`CONCEPTS`), through helpers, so other
concepts drop in by changing that table.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from .paths import REPO
from .playground_loras import playground_sha256
from .server import ComfyServer, prepare_workspace
from .workflow import GraphBuilder

log = logging.getLogger(__name__)

EXAMPLES = REPO / "example_workflows"


@dataclass(frozen=True)
class Concept:
    """A playground concept LoRA: its file, and a prompt that draws it (with where, when it has a place)."""

    lora: str
    prompt: str


CONCEPTS = {
    "ring": Concept("playground_ring.safetensors", "a blue ring on the left"),
    "stripes": Concept("playground_stripes.safetensors", "a yellow striped triangle on the right"),
    "star": Concept("playground_star.safetensors", "a red star in the center"),
}
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)
SEED, STEPS, CFG = 3, 20, 3.0
# Interfering cases of the playground world (``playground/scoring.py``) and their seeds, chosen on the *tune*
# split (``loom bench quality --split tune``). The default run (``make run``): a style LoRA with no trigger word
# (vertical bars) wanted on the left object only; merged, it paints every object it reaches, the right one too,
# while Loom Compose keeps it in its half. "Regions vs merge": two object LoRAs taught on one class word ("toy":
# one draws a star, the other a ring); merged, both act on every "toy" and blend.
PLAYGROUND_CASE, PLAYGROUND_SEED = "bars-plain/blue-green", 0
VERSUS_CASE, VERSUS_SEED = "startoy-ringtoy/yellow-red", 0
ENLARGE = 4.0  # the 64x64 playground images are saved 4x enlarged (nearest), so they read at a glance

# --------------------------------------------------------------------------------------------- layout
# Width and height each node type takes once the frontend has drawn it (widgets, editors, image previews), with
# room to spare; used to place nodes without overlap. The browser test checks the drawn sizes.
NODE_SIZES = {
    "Note": (420, 300), "LoomPlaygroundModel": (280, 90), "LoomLoraStack": (480, 300), "LoomRegion": (360, 720),
    "LoomCompose": (380, 1000), "LoomLibrarySearch": (380, 560), "CLIPTextEncode": (400, 240),
    "LoomPlaygroundLatent": (300, 150), "KSampler": (320, 300), "LoomPlaygroundDecode": (260, 70),
    "ImageStitch": (300, 180), "ImageScaleBy": (300, 100), "SaveImage": (420, 560), "LoomRegionPreview": (300, 120),
    "LoomGateSchedule": (380, 560), "LoomCLoraConcept": (380, 460), "LoomCLora": (380, 700),
    "LoomCLoraMasks": (300, 130),
}
STACK_ROW_HEIGHT = 34
GAP_X, GAP_Y = 80, 50
VIEW = {"scale": 0.8, "offset": [90, 200]}  # opens with the note and the first columns readable, clear of the menus


def node_size(node: dict) -> tuple[int, int]:
    """The size :func:`layout` reserves for ``node``."""
    width, height = NODE_SIZES.get(node["type"], (320, 220))
    if node["type"] == "LoomLoraStack":
        height += STACK_ROW_HEIGHT * len(json.loads(node["widgets_values"][0] or "[]"))
    return width, height


def layout(g: GraphBuilder) -> None:
    """Place every node: column = longest path from a source (a source: just before its first consumer; the
    note first), top to bottom in the order the nodes were added; sizes from :func:`node_size`, so no two nodes
    overlap."""
    depth = {n["id"]: 0 for n in g.nodes}
    for _ in g.nodes:  # longest path by relaxation (graphs here are small and acyclic)
        for link in g.links:
            depth[link[3]] = max(depth[link[3]], depth[link[1]] + 1)
    for node in g.nodes:  # a node with no inputs (a latent, a gate) sits just before its first consumer
        targets = [depth[link[3]] for link in g.links if link[1] == node["id"]]
        if targets and not any(link[3] == node["id"] for link in g.links):
            depth[node["id"]] = max(depth[node["id"]], min(targets) - 1)
    columns: dict[int, list[dict]] = {}
    for node in g.nodes:
        columns.setdefault(depth[node["id"]], []).append(node)
    x = 0
    for column in sorted(columns):
        nodes = columns[column]
        y = 0
        for node in nodes:
            width, height = node_size(node)
            node["pos"], node["size"] = [x, y], [width, height]
            y += height + GAP_Y
        x += max(node_size(n)[0] for n in nodes) + GAP_X


# ------------------------------------------------------------------------------------ graph pieces
def rows_json(*loras: str, strength: float = 1.0) -> str:
    """A Loom LoRA Stack's rows JSON, each LoRA pinned to its sha256 (as the stack editor writes it)."""
    return json.dumps([{"lora": lora, "on": True, "strength": strength, "sha256": playground_sha256(lora)}
                       for lora in loras], indent=1)


def note(g: GraphBuilder, title: str, text: str) -> int:
    """A note node (frontend-only: never sent to the server) that says what the workflow shows."""
    node_id = len(g.nodes) + 1
    g.nodes.append({"id": node_id, "type": "Note", "pos": [0, 0], "size": [420, 300], "flags": {}, "order": 0,
                    "mode": 0, "inputs": [], "outputs": [], "title": title, "properties": {},
                    "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
    return node_id


def wire(g: GraphBuilder, *links: tuple[int, int, int, str]) -> None:
    for src, slot, dst, name in links:
        g.connect(src, slot, dst, name)


def sample(g: GraphBuilder, model: int, clip: int, positive: int, positive_slot: int = 0,
           title: str = "", seed: int = SEED) -> tuple[int, int]:
    """Latent, negative prompt, KSampler and decode for the playground; returns (sampler, decoded image)."""
    neg = prompt(g, clip, "", "Negative (empty)")
    latent = g.add("LoomPlaygroundLatent", (0, 0), width=64, height=64, batch_size=1)
    sampler = g.add("KSampler", (0, 0), title=title or None, seed=seed, steps=STEPS, cfg=CFG, sampler_name="euler",
                    scheduler="simple", denoise=1.0)
    decode = g.add("LoomPlaygroundDecode", (0, 0))
    wire(g, (model, 0, sampler, "model"), (positive, positive_slot, sampler, "positive"),
         (neg, 0, sampler, "negative"), (latent, 0, sampler, "latent_image"), (sampler, 0, decode, "samples"))
    return sampler, decode


def prompt(g: GraphBuilder, clip: int, text: str, title: str = "Prompt", slot: int = 1) -> int:
    """CLIP Text Encode of ``text`` reading the CLIP at output ``slot`` of ``clip`` (playground model: 1, stack: 1)."""
    node = g.add("CLIPTextEncode", (0, 0), title=title, text=text)
    g.connect(clip, slot, node, "clip")
    return node


def side_by_side(g: GraphBuilder, left: int, right: int, prefix: str, title: str, right_slot: int = 0,
                 right_full_size: bool = False) -> int:
    """``left`` | ``right`` (IMAGE outputs; ``right``'s at ``right_slot``) stitched with a white gap and saved
    under ``prefix``, 64x64 samples enlarged :data:`ENLARGE` times; ``right_full_size``: ``right`` is drawn at
    the enlarged size already (a region preview), so only ``left`` is enlarged."""
    stitch = g.add("ImageStitch", (0, 0), title=title, direction="right", match_image_size=True, spacing_width=4,
                   spacing_color="white")
    enlarge = g.add("ImageScaleBy", (0, 0), upscale_method="nearest-exact", scale_by=ENLARGE)
    save = g.add("SaveImage", (0, 0), title=f"Result: {title}", filename_prefix=prefix)
    if right_full_size:
        wire(g, (left, 0, enlarge, "image"), (enlarge, 0, stitch, "image1"), (right, right_slot, stitch, "image2"),
             (stitch, 0, save, "images"))
    else:
        wire(g, (left, 0, stitch, "image1"), (right, right_slot, stitch, "image2"), (stitch, 0, enlarge, "image"),
             (enlarge, 0, save, "images"))
    return save


def region_chain(g: GraphBuilder, regions: tuple[tuple[str, tuple], ...],
                 adapters: Callable[[int], tuple[int, int] | None]) -> int:
    """One Loom Region per ``(prompt, box)`` of ``regions``, chained in order, each fed by the node output
    ``adapters(i)`` makes for it (``(node, slot)``, made just before its region; None: a region with no LoRA);
    returns the last region."""
    previous = None
    for i, (text, box) in enumerate(regions):
        source = adapters(i)
        region = g.add("LoomRegion", (0, 0), title=f"Region {i + 1}", prompt=text,
                       x0=box[0], y0=box[1], x1=box[2], y1=box[3])
        if source is not None:
            g.connect(source[0], source[1], region, "adapters")
        if previous is not None:
            g.connect(previous, 0, region, "regions")
        previous = region
    return previous


def playground_case(name: str = PLAYGROUND_CASE):
    """The :class:`~lora_loom.playground.scoring.Case` named ``name`` (default: the one ``make run`` draws)."""
    from lora_loom.playground import scoring

    return scoring.case_named(name)


def case_regions(g: GraphBuilder, model: int, case) -> int:
    """The case's regions, each painted by its concepts' LoRAs through its own Loom LoRA Stack (a plain region,
    none); returns the last Loom Region."""
    def stack(i: int) -> tuple[int, int] | None:
        names = case.regions[i].concepts
        if not names:
            return None
        node = g.add("LoomLoraStack", (0, 0), title=f"LoRAs for region {i + 1}",
                     rows=rows_json(*(f"playground_{n}.safetensors" for n in names)))
        g.connect(model, 0, node, "model")
        return node, 2

    return region_chain(g, tuple((r.prompt, r.box) for r in case.regions), stack)


def case_merged(g: GraphBuilder, base: int, case, seed: int) -> int:
    """Every LoRA of ``case`` merged into the model (the naive way), sampled with the case's prompt; returns the
    decoded image."""
    files = [f"playground_{n}.safetensors" for n in case.concepts]
    merged = g.add("LoomLoraStack", (0, 0), title="The same LoRAs merged (the naive way)", rows=rows_json(*files))
    wire(g, (base, 0, merged, "model"), (base, 1, merged, "clip"))
    positive = prompt(g, merged, case.prompt, "Prompt (merged)")
    return sample(g, merged, base, positive, title="Sample: merged", seed=seed)[1]


def compose(g: GraphBuilder, base: int, regions: int, text: str) -> int:
    node = g.add("LoomCompose", (0, 0), global_prompt=text)
    wire(g, (base, 0, node, "model"), (base, 1, node, "clip"), (regions, 0, node, "regions"))
    return node


def finish(g: GraphBuilder, title: str, text: str) -> dict:
    note(g, title, text)
    g.nodes.insert(0, g.nodes.pop())  # the note first: column 0, top
    layout(g)
    return g.workflow({"ds": VIEW})


def two_concepts_prompt(a: str = "ring", b: str = "stripes") -> str:
    """The global prompt naming both concepts where they are, e.g. 'a blue ring on the left and a yellow ...'."""
    return f"{CONCEPTS[a].prompt} and {CONCEPTS[b].prompt}"


# ------------------------------------------------------------------------------------------ examples
def playground(info: dict) -> dict:
    """The default run: a style LoRA wanted on one object only, composed by Loom Compose; the result, the regions,
    and composed | merged with the same seed."""
    g = GraphBuilder(info)
    case = playground_case()
    base = g.add("LoomPlaygroundModel", (0, 0))
    regions = case_regions(g, base, case)
    composed = compose(g, base, regions, case.prompt)
    _, image = sample(g, composed, base, composed, 1, title="Sample with the composed model", seed=PLAYGROUND_SEED)
    enlarge = g.add("ImageScaleBy", (0, 0), upscale_method="nearest-exact", scale_by=ENLARGE)
    save = g.add("SaveImage", (0, 0), title="Result: composed", filename_prefix="loom_playground")
    preview = g.add("LoomRegionPreview", (0, 0), width=256, height=256)
    save_preview = g.add("SaveImage", (0, 0), title="The regions asked for", filename_prefix="loom_playground_regions")
    wire(g, (image, 0, enlarge, "image"), (enlarge, 0, save, "images"), (regions, 0, preview, "regions"),
         (preview, 0, save_preview, "images"))
    merged = case_merged(g, base, case, PLAYGROUND_SEED)
    side_by_side(g, image, merged, "loom_playground_vs_merged", "Composed | merged")
    return finish(g, "Playground: a style in one region", (
        "The playground Flux (trained in this repository on drawn shapes) never saw vertical bars: a style LoRA "
        "with no trigger word teaches them, on every object it reaches.\n\nLoom Compose applies it only inside the "
        "left region, in one pass per step; the right object stays plain.\n\nMerged into the model (the usual "
        "way) the same LoRA bars the right object too.\n\nResults: the picture, the regions it was asked for, "
        "and composed | merged (same seed)."))


def regions_vs_merge(info: dict) -> dict:
    """The same LoRAs merged into the model (the usual way) and composed by regions, side by side, on a case
    where merged LoRAs interfere."""
    g = GraphBuilder(info)
    case = playground_case(VERSUS_CASE)
    base = g.add("LoomPlaygroundModel", (0, 0))
    merged = case_merged(g, base, case, VERSUS_SEED)
    regions = case_regions(g, base, case)
    composed = compose(g, base, regions, case.prompt)
    _, regional = sample(g, composed, base, composed, 1, title="Sample: regions", seed=VERSUS_SEED)
    side_by_side(g, merged, regional, "loom_regions_vs_merge", "Merged | regions")
    return finish(g, "Regions vs merge", (
        "Same prompt, seed and LoRAs, two ways. Both LoRAs were taught on the word 'toy': one draws a star, the "
        "other a ring.\n\nLeft: the LoRAs merged into the model, so both act on every 'toy' and the two objects "
        "blend.\n\nRight: Loom Compose applies each LoRA only in its own region: a yellow star on the left, a red "
        "ring on the right.\n\nResult: merged | regions."))


def clora(info: dict) -> dict:
    """CLoRA without drawn regions: each LoRA steered to its concept word, fused by attention masks; the
    picture beside the masks it found."""
    g = GraphBuilder(info)
    base = g.add("LoomPlaygroundModel", (0, 0))
    text = two_concepts_prompt()
    previous = None
    for i, (name, word) in enumerate((("ring", "ring"), ("stripes", "triangle"))):
        stack = g.add("LoomLoraStack", (0, 0), title=f"LoRA {i + 1}", rows=rows_json(CONCEPTS[name].lora))
        item = g.add("LoomCLoraConcept", (0, 0), title=f"Concept {i + 1}: {word}", prompt=text, concept=word)
        wire(g, (base, 0, stack, "model"), (stack, 2, item, "adapters"))
        if previous is not None:
            g.connect(previous, 0, item, "concepts")
        previous = item
    node = g.add("LoomCLora", (0, 0), base_prompt=text)
    wire(g, (base, 0, node, "model"), (base, 1, node, "clip"), (previous, 0, node, "concepts"))
    sampler, image = sample(g, node, base, node, 1, title="Sample with CLoRA")
    masks = g.add("LoomCLoraMasks", (0, 0))
    wire(g, (node, 2, masks, "clora"), (sampler, 0, masks, "samples"))
    side_by_side(g, image, masks, "loom_clora", "CLoRA | its masks", right_slot=1)
    return finish(g, "CLoRA: two LoRAs and their masks", (
        "No boxes drawn: CLoRA finds where each concept word is from attention, keeps the concepts apart in the "
        "first steps and fuses each LoRA's prediction with its mask.\n\nResult: the picture | the masks CLoRA "
        "found (one colour per LoRA)."))


def gate_schedules(info: dict) -> dict:
    """One LoRA, two gate schedules: on for the first steps only (the shape forms) vs the last steps only."""
    g = GraphBuilder(info)
    base = g.add("LoomPlaygroundModel", (0, 0))
    concept = CONCEPTS["ring"]
    text = concept.prompt.replace(" on the left", " in the center")
    images = []
    for title, keyframes in (("Early: first 40% of steps", "0:1, 0.4:0"), ("Late: last 60% of steps", "0:0, 0.4:1")):
        gate = g.add("LoomGateSchedule", (0, 0), title=f"Gate: {title}", lora=concept.lora, keyframes=keyframes,
                     interpolation="hold", preview_steps=STEPS)
        stack = g.add("LoomLoraStack", (0, 0), title=f"Gated stack ({title.split(':')[0].lower()})",
                      rows=rows_json(concept.lora))
        wire(g, (gate, 0, stack, "gates"), (base, 0, stack, "model"), (base, 1, stack, "clip"))
        positive = prompt(g, base, text)
        images.append(sample(g, stack, base, positive, title=f"Sample: {title.split(':')[0].lower()}")[1])
    side_by_side(g, images[0], images[1], "loom_gate_schedules", "Early | late")
    return finish(g, "Gate schedule: early vs late", (
        "One ring LoRA, gated over sampling by Loom Gate Schedule (applied inside the layers, no re-patching); "
        "each gate node plots its schedule.\n\nLeft: the LoRA acts only in the first 40% of steps.\nRight: only "
        "in the last 60%.\n\nResult: early | late: what each part of sampling takes from the LoRA."))


def library_compose(info: dict) -> dict:
    """Each region's LoRA found by Loom Library Search from words (the node shows its picks), then composed."""
    g = GraphBuilder(info)
    base = g.add("LoomPlaygroundModel", (0, 0))
    queries = ("ring shape", "striped texture")

    def search(i: int) -> tuple[int, int]:
        return g.add("LoomLibrarySearch", (0, 0), title=f"Find a LoRA for region {i + 1}", prompt=queries[i],
                     top_k=1, strength=1.0, rescan=False), 1

    previous = region_chain(g, ((CONCEPTS["ring"].prompt, LEFT), (CONCEPTS["stripes"].prompt, RIGHT)), search)
    composed = compose(g, base, previous, two_concepts_prompt())
    _, image = sample(g, composed, base, composed, 1, title="Sample with the composed model")
    preview = g.add("LoomRegionPreview", (0, 0), width=256, height=256)
    g.connect(previous, 0, preview, "regions")
    side_by_side(g, image, preview, "loom_library_compose", "Composed | regions", right_full_size=True)
    return finish(g, "Library search, then compose", (
        "Each region's LoRA is found in your LoRA folders by Loom Library Search from a few words ('ring shape', "
        "'striped texture'); after a run each search node shows what it picked and why.\n\nResult: the "
        "picture | the regions, with the LoRAs the searches picked."))


def stack(info: dict) -> dict:
    """The base model beside the same model with a concept LoRA merged by Loom LoRA Stack."""
    g = GraphBuilder(info)
    base = g.add("LoomPlaygroundModel", (0, 0))
    concept = CONCEPTS["star"]
    positive = prompt(g, base, concept.prompt, "Prompt (base)")
    _, plain = sample(g, base, base, positive, title="Sample: base model")
    merged = g.add("LoomLoraStack", (0, 0), title="Loom LoRA Stack", rows=rows_json(concept.lora))
    wire(g, (base, 0, merged, "model"), (base, 1, merged, "clip"))
    with_lora = prompt(g, merged, concept.prompt, "Prompt (with the LoRA)")
    _, lora_image = sample(g, merged, base, with_lora, title="Sample: with the star LoRA")
    side_by_side(g, plain, lora_image, "loom_stack", "Base | with the LoRA")
    return finish(g, "LoRA stack: base vs one LoRA", (
        "The playground model has never seen a star. Loom LoRA Stack merges the star LoRA (any LoRA format; "
        "drag more from the LoRA Library onto the stack).\n\nResult: base model | with the LoRA."))


@dataclass(frozen=True)
class Example:
    """One shared workflow: its file name is its title in ComfyUI's template browser."""

    title: str
    build: Callable[[dict], dict]
    result_prefix: str  # the SaveImage prefix of the image its thumbnail is made from

    @property
    def file_name(self) -> str:
        return f"{self.title}.json"


EXAMPLES_LIST = (
    Example("Loom playground - two regions", playground, "loom_playground"),
    Example("Loom regions vs merge", regions_vs_merge, "loom_regions_vs_merge"),
    Example("Loom CLoRA - LoRAs and masks", clora, "loom_clora"),
    Example("Loom gates - early vs late", gate_schedules, "loom_gate_schedules"),
    Example("Loom library search then compose", library_compose, "loom_library_compose"),
    Example("Loom LoRA stack - base vs LoRA", stack, "loom_stack"),
)
PLAYGROUND_EXAMPLE = EXAMPLES_LIST[0]


def example(title: str) -> Example:
    return next(e for e in EXAMPLES_LIST if e.title == title)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[loom examples] %(message)s")
    with ComfyServer(prepare_workspace()) as server:
        info = server.get_json("/object_info")
        EXAMPLES.mkdir(exist_ok=True)
        for item in EXAMPLES_LIST:
            (EXAMPLES / item.file_name).write_text(json.dumps(item.build(info), indent=1) + "\n")
            log.info("wrote %s", EXAMPLES / item.file_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
