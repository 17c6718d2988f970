"""The configuration shown in README.md and config/example.yaml is valid as written."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from proxy.config.schema import load, parse

REPO = Path(__file__).resolve().parent.parent


def readme_config_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration", 1)[1]
    return re.search(r"```yaml\n(.*?)```", section, re.S).group(1)


def test_the_readme_configuration_parses_with_its_documented_defaults():
    config = parse(yaml.safe_load(readme_config_block()), source="README.md", base_dir=REPO)
    (listener,) = config.listeners
    assert listener.client_auth.allow.uri_sans == ("spiffe://acme/ns/prod/*",)
    assert listener.backend.protocol == "tcp"
    assert config.drain_timeout == 30
    assert config.reload.watch_interval == 5


def test_the_example_config_parses():
    config = load(REPO / "config" / "example.yaml")
    assert config.listeners[0].name == "api"
