"""The conda environments pin the same versions as the pip requirements."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _pins(lines):
    pins = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s#]+)\s*(#.*)?", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_conda_envs_match_requirements():
    # the export env also pins the optional ONNX packages (requirements-export.txt)
    requirements = _pins((REPO / "requirements.txt").read_text().splitlines() + (REPO / "requirements-export.txt").read_text().splitlines())
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        spec = yaml.safe_load(env.read_text())
        pip_section = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
        pins = _pins(pip_section)
        assert pins, env
        for name, version in pins.items():
            assert requirements.get(name) == version, f"{env.name}: {name}=={version} vs requirements.txt"
        # the interpreter matches what the README and Makefile use
        assert "python=3.11" in spec["dependencies"]


def test_every_rule_names_a_conda_env_that_exists():
    for smk in (REPO / "workflow/rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / env).resolve().is_file(), f"{smk.name}: {env}"
