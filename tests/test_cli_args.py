"""The command line's argument dataclasses (fastcd.cli_args): list tokens, help on every field, and the choices
taken from the one vocabulary of each setting (the parsers built from them: test_cli.py)."""

import argparse
import dataclasses

import pytest

from fastcd import cli_args
from fastcd.cli_args import flat, int_list, str_list
from fastcd.config import DISCOVERY_METHODS, MATCH_METHODS

ARGS = [getattr(cli_args, n) for n in dir(cli_args) if n.endswith("Args") and dataclasses.is_dataclass(
    getattr(cli_args, n))]


def test_list_tokens():
    assert int_list("3") == [3] and int_list("0,1,2") == [0, 1, 2] and int_list("0,1,") == [0, 1]
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected integers like 0,1,2 or 0 1 2, got '0,x'"):
        int_list("0,x")
    assert str_list("a") == ["a"] and str_list("a,b") == ["a", "b"]
    assert flat([[0, 1], [2]]) == [0, 1, 2] and flat([0, 1]) == [0, 1]  # `--seeds 0,1 2` = `--seeds 0 1 2`


def test_every_field_of_every_command_has_help():
    assert len(ARGS) == 8
    for cls in ARGS:
        for f in dataclasses.fields(cls):
            if cls is cli_args.PretrainArgs and f.name == "extra":
                continue  # internal: not a flag (the one field without help)
            assert f.metadata.get("help", "").strip(), f"{cls.__name__}.{f.name} has no help"


def test_choices_come_from_the_settings_vocabularies():
    fields = {f.name: f for f in dataclasses.fields(cli_args.MatchArgs)}
    assert tuple(fields["method"].metadata["choices"]) == tuple(MATCH_METHODS)
    disc = {f.name: f for f in dataclasses.fields(cli_args.DiscoverArgs)}["method"].metadata["choices"]
    assert set(DISCOVERY_METHODS) <= set(disc) and {"auto", "search"} <= set(disc)
