"""Admin API tokens are passed to the CLI as `--token TOKEN`: one starting with "-" would be read as an
option (argparse: "expected one argument"), so none is ever issued."""

from __future__ import annotations

import argparse
import secrets

import pytest

from router.governance import cli as gov_cli
from router.governance import service


def test_a_token_starting_with_a_dash_is_never_issued(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["-starts-with-a-dash", "--two", "fine-token_x"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(drawn))
    assert service.new_admin_token() == "fine-token_x"


def test_issued_tokens_are_url_safe_256_bit_and_the_cli_takes_them() -> None:
    parser = argparse.ArgumentParser(prog="payroute")
    gov_cli.add_admin_parser(parser.add_subparsers(dest="command", required=True))
    tokens = {service.new_admin_token() for _ in range(2000)}  # ~31 would start with "-" otherwise
    assert len(tokens) == 2000
    for token in tokens:
        assert len(token) == 43 and not token.startswith("-")
        assert parser.parse_args(["admin", "list", "--token", token]).token == token
