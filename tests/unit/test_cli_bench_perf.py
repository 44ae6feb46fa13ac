"""``loom bench perf --region-tokens``: a count, ``full`` (= 0, untrimmed) or an error naming the option; the
title says that only Loom regional's region prompts are trimmed."""
from __future__ import annotations

import argparse

import pytest
from lora_loom.cli.bench_perf import region_note, register_perf


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loom bench")
    register_perf(parser.add_subparsers())
    return parser.parse_args(["perf", *argv])


@pytest.mark.parametrize(("argv", "tokens"), [((), 12), (("--region-tokens", "5"), 5),
                                              (("--region-tokens", "full"), 0), (("--region-tokens", "0"), 0)])
def test_region_tokens(argv: tuple[str, ...], tokens: int) -> None:
    assert _parse(*argv).region_tokens == tokens


@pytest.mark.parametrize("value", ["-1", "half"])
def test_bad_region_tokens_name_the_option(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--region-tokens", value)
    assert "--region-tokens" in capsys.readouterr().err


def test_region_note_says_only_loom_regional_trims() -> None:
    assert region_note(77, 12) == "Loom regional's region prompts trimmed to 12 (peers untrimmed)"
    assert region_note(77, 77) == "region prompts untrimmed"


def test_help_says_the_peers_use_full_prompts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse("--help")
    text = " ".join(capsys.readouterr().out.split())
    assert "the peers (hooks, CLoRA, dense_per_head) always use --prompt-tokens" in text


@pytest.mark.parametrize(("argv", "counts"), [((), (1, 4)), (("--patch-loras", "0"), ()),
                                              (("--patch-loras", "none"), ()), (("--patch-loras", "2,8"), (2, 8))])
def test_patch_step_counts(argv: tuple[str, ...], counts: tuple[int, ...]) -> None:
    assert _parse(*argv).patch_loras == counts


@pytest.mark.parametrize(("option", "value"), [("--patch-loras", "-1"), ("--patch-rank", "0"),
                                               ("--patch-repeats", "nan")])
def test_bad_patch_options_name_the_option(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(option, value)
    assert option in capsys.readouterr().err
