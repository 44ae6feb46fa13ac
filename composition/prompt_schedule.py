"""Import A1111 / comfyui-prompt-control prompt schedules into gate schedules and timed text segments.

Supported syntax (prompt-control's documented grammar, doc/schedules.md; a fraction is a percent of
sampling, 0.0 to 1.0):

* ``<lora:name:0.8>`` constant model strength (clip strength = model strength); ``<lora:name:0.8:0.5>``
  model 0.8, clip 0.5 (prompt-control's order; A1111 puts the text-encoder weight first);
  ``<lora:name>`` strength 1. Names may contain spaces and ``/``.
* ``[a:b:0.3]`` text ``a`` before 30 %, ``b`` from 30 %; ``[b:0.3]`` = ``[:b:0.3]``; ``[a::0.5]`` until 50 %.
* ranges ``[a:b:c:0.3,0.7]``, ``[b:0.1,0.4]`` = ``[:b::0.1,0.4]``, ``[b:c:0.1,0.4]`` = ``[:b:c:0.1,0.4]``;
  ``[a:b:c:0.1]`` = ``[a:b:c:0.1,1.0]``.
* nesting of any of these inside each other, with switch points that are global percents
  (``a [red:[blue::0.7]:0.5] cat``); LoRA tags anywhere inside (``[<lora:x:1>::0.5]``).
* alternation ``[a|b]`` / ``[a|b:0.2]`` (switch every 0.1 or the given fraction) and sequences
  ``[SEQ:a:0.3:b:0.6]`` = ``[a:[b::0.6]:0.3]``.
* step numbers (an integer without ``.``) when ``num_steps`` is given, as prompt-control's Advanced nodes.
* ``\\`` escapes the next character (``\\:``, ``\\[``, ``\\<`` ...). ``( ... )`` groups are kept as text and
  protect ``:`` inside them (``[(cat:1.2):dog:0.5]``); ``[word]`` without ``:`` is kept as text.

Not supported (an error with a caret): tag filters ``[a:b:TAG]``, extra fields in a lora tag
(prompt-control's block weights ``<lora:x:1:1:LBW=...>``), unbalanced brackets/parentheses. Not handled:
``#`` comments, ``<emb:...>`` (kept as text). A1111-style emphasis weights are left in the text.

Semantics: a switch at ``q`` takes effect for progress ``>= q`` (ComfyUI's ``start_percent``). The same
LoRA may appear in several places but may not be active twice at the same moment.
"""
from __future__ import annotations

import bisect
import logging
import math
import re
from dataclasses import dataclass

from .block_weights import BlockWeights, point_at
from .gates import GateSchedule, Keyframe
from .numbers import STRENGTH_LIMIT

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_TAG = re.compile(r"^[A-Z_]+$")
_LORA_OPEN = "<lora:"
DEFAULT_ALTERNATION = 0.1


class PromptSyntaxError(ValueError):
    """Malformed or unsupported prompt syntax; the message shows the prompt with a caret and the column."""

    def __init__(self, reason: str, prompt: str, position: int) -> None:
        super().__init__(f"{reason} at {point_at(prompt, position)}")
        self.reason = reason
        self.prompt = prompt
        self.position = position


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:name:model:clip>`` tag."""

    name: str
    model_strength: float
    clip_strength: float


@dataclass(frozen=True)
class PromptSegment:
    """The prompt text and active LoRAs from ``start`` (inclusive) to ``end`` (exclusive; 1.0 inclusive)."""

    start: float
    end: float
    text: str
    loras: tuple[LoraTag, ...]


@dataclass(frozen=True)
class _Text:
    text: str


@dataclass(frozen=True)
class _Lora:
    tag: LoraTag
    position: int


@dataclass(frozen=True)
class _Schedule:
    options: tuple[tuple[_Node, ...], ...]
    points: tuple[float, ...]


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]
    every: float


_Node = _Text | _Lora | _Schedule | _Alternate


@dataclass(frozen=True)
class _Part:
    nodes: tuple[_Node, ...]
    start: int
    end: int


class _Parser:
    """Recursive descent over the prompt; positions are indices into ``prompt``."""

    def __init__(self, prompt: str, num_steps: int | None) -> None:
        self.prompt = prompt
        self.num_steps = num_steps
        self.index = 0

    def fail(self, reason: str, position: int) -> PromptSyntaxError:
        return PromptSyntaxError(reason, self.prompt, position)

    def sequence(self, stops: str) -> list[_Node]:
        nodes: list[_Node] = []
        text: list[str] = []
        prompt = self.prompt

        def flush() -> None:
            if text:
                nodes.append(_Text("".join(text)))
                text.clear()

        while self.index < len(prompt):
            char = prompt[self.index]
            if char in stops:
                break
            if char == "\\" and self.index + 1 < len(prompt):
                text.append(prompt[self.index + 1])
                self.index += 2
            elif char == "[":
                flush()
                nodes.extend(self.bracket())
            elif char == "(":
                opened = self.index
                text.append("(")
                self.index += 1
                flush()
                nodes.extend(self.sequence(")"))
                if self.index >= len(prompt):
                    raise self.fail("unclosed '('", opened)
                text.append(")")
                self.index += 1
            elif char in "])":
                raise self.fail(f"unmatched '{char}'", self.index)
            elif prompt.startswith(_LORA_OPEN, self.index):
                flush()
                nodes.append(self.lora())
            else:
                text.append(char)
                self.index += 1
        flush()
        return nodes

    def lora(self) -> _Lora:
        opened = self.index
        body_start = opened + len(_LORA_OPEN)
        close = self.prompt.find(">", body_start)
        if close < 0:
            raise self.fail("unclosed '<lora:' (missing '>')", opened)
        body = self.prompt[body_start:close]
        if any(char in body for char in "[]<\n"):
            raise self.fail("unclosed '<lora:' (missing '>')", opened)
        fields = body.split(":")
        starts = [body_start]
        for field in fields[:-1]:
            starts.append(starts[-1] + len(field) + 1)
        name = fields[0].strip()
        if not name:
            raise self.fail("a lora tag needs a name: <lora:name:strength>", body_start)
        if len(fields) > 3:
            raise self.fail("a lora tag takes at most two strengths (model, clip); extra fields such as block "
                            "weights are not supported here", starts[3])
        strengths = [self.number(field, start, "a lora strength") for field, start in zip(fields[1:], starts[1:])]
        model = strengths[0] if strengths else 1.0
        clip = strengths[1] if len(strengths) > 1 else model
        self.index = close + 1
        return _Lora(LoraTag(name, model, clip), opened)

    def number(self, raw: str, position: int, what: str, limit: float = STRENGTH_LIMIT) -> float:
        token = raw.strip()
        offset = position + len(raw) - len(raw.lstrip())
        if not _NUMBER.match(token):
            raise self.fail(f"expected {what} (a number), got {token!r}", offset)
        value = float(token)
        if not math.isfinite(value) or abs(value) > limit:
            raise self.fail(f"{what} {token} is outside [-{limit:g}, {limit:g}]", offset)
        return value

    def switch_point(self, raw: str, position: int) -> float:
        token = raw.strip()
        offset = position + len(raw) - len(raw.lstrip())
        value = self.number(raw, position, "a switch point", limit=1e9)
        if "." not in token:
            if self.num_steps:
                if not 0 <= value <= self.num_steps:
                    raise self.fail(f"step {token} is outside 0..{self.num_steps}", offset)
                return value / self.num_steps
            if value not in (0.0, 1.0):
                raise self.fail(f"step number {token} needs num_steps; write a fraction such as 0.5", offset)
        if not 0.0 <= value <= 1.0:
            raise self.fail(f"switch point {token} is outside 0.0..1.0", offset)
        return value

    def bracket(self) -> list[_Node]:
        opened = self.index
        self.index += 1
        parts: list[_Part] = []
        separators: list[tuple[str, int]] = []
        while True:
            start = self.index
            nodes = self.sequence(":|]")
            parts.append(_Part(tuple(nodes), start, self.index))
            if self.index >= len(self.prompt):
                raise self.fail("unclosed '['", opened)
            char = self.prompt[self.index]
            self.index += 1
            if char == "]":
                break
            separators.append((char, self.index - 1))
        if not separators:
            return [_Text("["), *parts[0].nodes, _Text("]")]
        if any(char == "|" for char, _ in separators):
            return [self.alternate(parts, separators)]
        raw = [self.prompt[part.start:part.end] for part in parts]
        if raw[0].strip() == "SEQ":
            return [self.seq(parts, raw)]
        return [self.schedule(parts, raw)]

    def alternate(self, parts: list[_Part], separators: list[tuple[str, int]]) -> _Alternate:
        every = DEFAULT_ALTERNATION
        if separators[-1][0] == ":":
            last = parts.pop()
            separators.pop()
            every = self.number(self.prompt[last.start:last.end], last.start, "an alternation interval")
            if not 0.0 < every <= 1.0:
                raise self.fail("alternation interval must be in (0, 1]", last.start)
        for char, position in separators:
            if char != "|":
                raise self.fail("':' inside an alternation [a|b:0.1] may only precede the interval", position)
        return _Alternate(tuple(part.nodes for part in parts), every)

    def seq(self, parts: list[_Part], raw: list[str]) -> _Schedule:
        if len(parts) < 3 or len(parts) % 2 == 0:
            raise self.fail("a sequence is [SEQ:a:N1:b:N2...] (prompt, point pairs)", parts[-1].start)
        options = tuple(part.nodes for part in parts[1::2]) + ((),)
        points = tuple(self.switch_point(raw[i], parts[i].start) for i in range(2, len(parts), 2))
        return self.checked(_Schedule(options, points), parts[2].start)

    def schedule(self, parts: list[_Part], raw: list[str]) -> _Schedule:
        last, text = parts[-1], raw[-1].strip()
        if _TAG.match(text):
            raise self.fail(f"tag selection [a:b:{text}] is not supported; use a switch point", last.start)
        fields = raw[-1].split(",")
        if len(fields) > 2 or not all(_NUMBER.match(field.strip()) for field in fields):
            raise self.fail("expected a switch point (0.0..1.0) or 'start,end' after the last ':'", last.start)
        positions = [last.start, last.start + len(fields[0]) + 1]
        points = tuple(self.switch_point(field, position) for field, position in zip(fields, positions))
        options = [part.nodes for part in parts[:-1]]
        if len(options) > 3:
            raise self.fail("a schedule has at most three prompts [before:during:after:N]", parts[3].start)
        if len(points) == 1:
            shapes = {1: [(), options[0]], 2: options, 3: options}
            points = points + (1.0,) if len(options) == 3 else points
        else:
            shapes = {1: [(), options[0], ()], 2: [(), *options], 3: options}
        return self.checked(_Schedule(tuple(tuple(o) for o in shapes[len(options)]), points), last.start)

    def checked(self, schedule: _Schedule, position: int) -> _Schedule:
        if any(a > b for a, b in zip(schedule.points, schedule.points[1:])):
            raise self.fail(f"switch points {schedule.points} must not decrease", position)
        return schedule


def _switch_points(nodes: tuple[_Node, ...] | list[_Node], into: set[float]) -> None:
    for node in nodes:
        if isinstance(node, _Schedule):
            into.update(node.points)
        elif isinstance(node, _Alternate):
            count = math.ceil(1.0 / node.every - 1e-9)
            into.update(round(k * node.every, 12) for k in range(1, count))
        if isinstance(node, (_Schedule, _Alternate)):
            for option in node.options:
                _switch_points(option, into)


def _evaluate(nodes: tuple[_Node, ...] | list[_Node], progress: float, text: list[str], loras: list[_Lora]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            text.append(node.text)
        elif isinstance(node, _Lora):
            loras.append(node)
        elif isinstance(node, _Schedule):
            _evaluate(node.options[bisect.bisect_right(node.points, progress)], progress, text, loras)
        else:
            chosen = math.floor(progress / node.every + 1e-9) % len(node.options)
            _evaluate(node.options[chosen], progress, text, loras)


def _clean(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text).strip()


@dataclass(frozen=True)
class PromptSchedule:
    """A parsed prompt: timed text segments covering [0, 1] and the LoRAs active in each."""

    prompt: str
    segments: tuple[PromptSegment, ...]

    def adapters(self) -> list[str]:
        """LoRA names in order of first activity."""
        names: list[str] = []
        for segment in self.segments:
            names.extend(tag.name for tag in segment.loras if tag.name not in names)
        return names

    def text_at(self, progress: float) -> str:
        """The prompt text in effect at ``progress``."""
        starts = [segment.start for segment in self.segments]
        return self.segments[max(bisect.bisect_right(starts, progress) - 1, 0)].text

    def gate_schedules(self, blocks: BlockWeights | None = None) -> list[GateSchedule]:
        """One hold-interpolated gate per LoRA (model strengths), in :meth:`adapters` order."""
        schedules = []
        for name in self.adapters():
            frames: list[Keyframe] = []
            for segment in self.segments:
                value = next((tag.model_strength for tag in segment.loras if tag.name == name), 0.0)
                if not frames or frames[-1].value != value:
                    frames.append(Keyframe(segment.start, value))
            schedules.append(GateSchedule(name, tuple(frames), "hold", blocks))
        return schedules


def parse_prompt_schedule(prompt: str, num_steps: int | None = None) -> PromptSchedule:
    """Parse ``prompt`` (syntax in the module docstring) into a :class:`PromptSchedule`."""
    parser = _Parser(prompt, num_steps)
    nodes = parser.sequence("")
    points: set[float] = {0.0}
    _switch_points(nodes, points)
    starts = sorted(p for p in points if 0.0 <= p < 1.0)
    segments: list[PromptSegment] = []
    for number, start in enumerate(starts):
        end = starts[number + 1] if number + 1 < len(starts) else 1.0
        text: list[str] = []
        found: list[_Lora] = []
        _evaluate(nodes, start, text, found)
        seen: dict[str, int] = {}
        for lora in found:
            if lora.tag.name in seen:
                raise PromptSyntaxError(f"LoRA {lora.tag.name!r} is active twice at {start:g} (also at column "
                                        f"{seen[lora.tag.name] + 1})", prompt, lora.position)
            seen[lora.tag.name] = lora.position
        segment = PromptSegment(start, end, _clean("".join(text)), tuple(lora.tag for lora in found))
        previous = segments[-1] if segments else None
        if previous is not None and (previous.text, previous.loras) == (segment.text, segment.loras):
            segments[-1] = PromptSegment(previous.start, end, previous.text, previous.loras)
        else:
            segments.append(segment)
    logger.debug("prompt schedule: %d segments from %d switch points", len(segments), len(starts))
    return PromptSchedule(prompt, tuple(segments))
