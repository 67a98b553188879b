"""The reference docs stay true to the code: every setting of a pipeline file is documented in
docs/configuration.md, and every command the README lists exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from connector.cli import build_parser
from connector.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]


def settings() -> list[str]:
    out = []
    for section, field in PipelineConfig.model_fields.items():
        model = field.annotation
        model = next((a for a in getattr(model, "__args__", (model,)) if isinstance(a, type)), model)
        if isinstance(model, type) and issubclass(model, BaseModel):
            out += [f"{section}.{key}" for key in model.model_fields]
    return out


def test_every_setting_is_in_the_configuration_reference():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([a-z_]+\.[a-z_]+)`", text))
    # rows that document a group of keys at once: "`kafka.sasl_mechanism`, `kafka.sasl_plain_username`, …"
    # and "`validation.job_actions_topic` / `group_id`"
    for row in re.findall(r"^\| (`[a-z_]+\.[a-z_]+`[^|]*)\|", text, flags=re.M):
        section = row[1 : row.index(".")]
        documented |= {f"{section}.{k}" for k in re.findall(r"`([a-z_]+)`", row)}
    missing = [s for s in settings() if s not in documented]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


def test_every_command_in_the_readme_exists(capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = set(re.findall(r"`tanium-connector ([a-z-]+)", text))
    assert {"run", "check", "validate-config", "validate", "demo", "bench"} <= commands
    for command in commands:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([command, "--help"])
        assert e.value.code == 0, f"README names `tanium-connector {command}`, which does not exist"
    capsys.readouterr()


def test_the_settings_list_is_complete():
    assert {"pipeline.name", "tanium.api_key_file", "kafka.max_unacked", "ha.enabled", "validation.query_time"} <= set(
        settings()
    )
