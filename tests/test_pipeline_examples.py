"""The pipeline examples in deploy/examples/ hold together: GitHub Actions workflows validate against
check-jsonschema's vendored schema (offline), and every graphprune command line in them, with the
declared default parameters filled in, parses with graphprune's own CLI parser. check-jsonschema has no
Argo Workflows schema and kubernetes-validate knows no Argo CRDs, so the WorkflowTemplate is checked
structurally here: kind and version, the entrypoint exists, every parameter it references is declared,
and its containers run non-root with a read-only root filesystem."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from graphprune.cli import _parser

EXAMPLES = Path(__file__).resolve().parents[1] / "deploy" / "examples"
WORKFLOWS = sorted((EXAMPLES / "github-actions").glob("*.yml"))
ARGO = sorted((EXAMPLES / "argo").glob("*.yaml"))


def _shell_words(line: str, env: dict[str, str]) -> list[str]:
    """A one-line command as bash would split it, for the `$VAR` and `${VAR:+WORDS}` forms used here."""
    line = re.sub(r"\$\{(\w+):\+([^}]*)\}", lambda m: m[2] if env.get(m[1]) else "", line)
    return shlex.split(re.sub(r"\$(\w+)", lambda m: env.get(m[1], m[0]), line))


def _argo_resolve(value: Any, scopes: dict[str, dict[str, Any]], where: str) -> str:
    """`{{workflow|inputs.parameters.X}}` replaced by the declared value, recursively; undeclared fails."""

    def one(m: re.Match[str]) -> str:
        declared = scopes[m[1]]
        assert m[2] in declared, f"{where}: {{{{{m[1]}.parameters.{m[2]}}}}} is not declared"
        return _argo_resolve(declared[m[2]], scopes, where)

    return re.sub(r"\{\{\s*(workflow|inputs)\.parameters\.([\w-]+)\s*\}\}", one, str(value))


def _check_cli(args: list[str]) -> None:
    """The arguments `graphprune ARGS` would get; argparse exits on anything it does not know."""
    assert args and args[0] in ("prune", "submit"), args
    ns = _parser().parse_args(args)
    assert 0 <= ns.sparsity < 1


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_github_workflow_schema(path: Path) -> None:
    tool = shutil.which("check-jsonschema", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                  os.environ.get("PATH", "")]))
    if tool is None:
        pytest.skip("check-jsonschema is not installed (the `test` extra has it)")
    for schema in ("vendor.github-workflows", "custom.github-workflows-require-timeout"):
        run = subprocess.run([tool, "--builtin-schema", schema, str(path)], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_github_workflow_commands_parse(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    dispatch = doc[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    inputs = {name: str(spec.get("default", "")) for name, spec in dispatch.items()}

    def resolve(text: str) -> str:
        return re.sub(r"\$\{\{\s*inputs\.([\w-]+)\s*\}\}", lambda m: inputs[m[1]], text)

    commands = 0
    for job in doc["jobs"].values():
        env = {k: resolve(str(v)) for k, v in {**doc.get("env", {}), **job.get("env", {})}.items()}
        for step in job["steps"]:
            script = re.sub(r"\\\n\s*", " ", step.get("run", ""))
            for line in script.splitlines():
                if line.strip().startswith("graphprune "):
                    _check_cli(_shell_words(line, env)[1:])
                    commands += 1
    assert commands >= 2  # local and remote


@pytest.mark.parametrize("path", ARGO, ids=lambda p: p.name)
def test_argo_workflow_template_structure(path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "WorkflowTemplate"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    workflow_params = {p["name"]: str(p.get("value", "")) for p in spec["arguments"]["parameters"]}
    templates = {t["name"]: t for t in spec["templates"]}
    assert spec["entrypoint"] in templates and len(templates) == len(spec["templates"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"] for v in spec.get("volumes", [])}
    for name, template in templates.items():
        inputs = {p["name"]: p.get("value", "") for p in template.get("inputs", {}).get("parameters", [])}
        scopes = {"workflow": workflow_params, "inputs": inputs}
        container = template["container"]
        assert container["command"] == ["graphprune"]
        _check_cli([_argo_resolve(a, scopes, name) for a in container["args"]])
        for var in container.get("env", []):
            _argo_resolve(var.get("value", ""), scopes, name)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes
        assert container["resources"]["limits"]["memory"]
        for artifact in template.get("outputs", {}).get("artifacts", []):
            assert artifact["path"].startswith("/tmp/"), "outputs must be on the writable /tmp volume"
