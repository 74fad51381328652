"""Readers for the deployment files: Dockerfile/Makefile install lines, YAML manifests, JSON schemas, PromQL."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import yaml
from packaging.requirements import Requirement
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.31.0"  # the Kubernetes API version the manifests are validated against (kubernetes-validate)


# ---- Dockerfile -------------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction with its continuation lines joined."""

    line: int
    keyword: str
    args: str


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[Instruction]:
    """Parse a Dockerfile into instructions (comments dropped, `\\` continuations joined)."""
    out: list[Instruction] = []
    buf, start = "", 0
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        s = raw.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):  # comment lines inside a continued instruction are skipped by docker
            continue
        if not buf:
            start = i
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
        buf = ""
    return out


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults and ENV values in order, `${VAR}`/`$VAR` expanded against earlier ones."""
    env: dict[str, str] = {}

    def expand(v: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], m[0]), v)

    for ins in instructions:
        if ins.keyword in ("ARG", "ENV"):
            for tok in shlex.split(ins.args):
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    env[k] = expand(v)
    return env


# ---- pip install lines ------------------------------------------------------------------------------------------

PIP_VALUE_OPTIONS = {
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-c",
    "--constraint",
    "-r",
    "--requirement",
    "--target",
    "-t",
    "--prefix",
    "--root",
    "--platform",
    "--python-version",
}


def pip_installs(shell: str) -> list[tuple[list[str], dict[str, str]]]:
    """Every `pip install` in a shell command: (requirement args, {option: value})."""
    found = []
    for part in re.split(r"&&|\|\||;", shell):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":  # pip, /venv/bin/pip, python -m pip
                reqs, opts, it = [], {}, iter(words[i + 2 :])
                for w in it:
                    if w in PIP_VALUE_OPTIONS:
                        opts[w] = next(it)
                    elif w in ("-e", "--editable"):
                        reqs.append(next(it))
                    elif not w.startswith("-"):
                        reqs.append(w)
                found.append((reqs, opts))
                break
    return found


def normalize_requirement(spec: str) -> str:
    """`torch==2.13.0` -> `torch==2.13.0`; a local path with extras (`.[server]`, `./[server]`) -> `.[server]`."""
    m = re.fullmatch(r"(\.|\./|\.\./[^\[]*)\[([\w,\s-]+)\]|(\.|\./)", spec)
    if m:
        path = (m[1] or m[3]).rstrip("/") or "."
        extras = sorted(e.strip() for e in (m[2] or "").split(",") if e.strip())
        return f"{path}[{','.join(extras)}]" if extras else path
    r = Requirement(spec)
    return f"{r.name.lower()}{','.join(sorted(str(s) for s in r.specifier))}"


def makefile_recipe(target: str, path: Path = ROOT / "Makefile") -> list[str]:
    """Recipe lines of `target` and, depth first, of its prerequisites, with make variables expanded."""
    text = path.read_text()
    variables: dict[str, str] = {}
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line[1:])
            continue
        m = re.match(r"^([A-Za-z_][\w]*)\s*(\?=|:=|=)\s*(.*)$", line)
        if m:
            variables.setdefault(m[1], m[3].strip()) if m[2] == "?=" else variables.__setitem__(m[1], m[3].strip())
            current = None
            continue
        m = re.match(r"^([^\s:#=][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            prereqs = m[2].split("|")[0].split() + (m[2].split("|")[1].split() if "|" in m[2] else [])
            recipe: list[str] = []
            for t in m[1].split():
                rules[t] = (prereqs, recipe)
            current = recipe
        else:
            current = None

    def expand(s: str) -> str:
        for _ in range(10):
            s2 = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m[1], ""), s)
            if s2 == s:
                break
            s = s2
        return s

    rules = {expand(k): (v[0], v[1]) for k, v in rules.items()}
    out: list[str] = []
    seen: set[str] = set()

    def visit(t: str) -> None:
        if t in seen or t not in rules:
            return
        seen.add(t)
        prereqs, recipe = rules[t]
        for p in prereqs:
            visit(expand(p))
        out.extend(expand(r).lstrip("@-") for r in recipe)

    visit(target)
    return out


# ---- .dockerignore ----------------------------------------------------------------------------------------------


def dockerignore_patterns(path: Path = ROOT / ".dockerignore") -> list[str]:
    return [s.strip().strip("/") for s in path.read_text().splitlines() if s.strip() and not s.startswith("#")]


def dockerignored(rel: str, patterns: list[str]) -> bool:
    """Whether `rel` (or a folder above it) matches a .dockerignore pattern (Go filepath.Match plus `**`)."""
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not modelled here"
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for p in patterns:
        rx = re.escape(p).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        rx = rx.replace(r"\?", "[^/]")
        if any(re.fullmatch(rx, c) for c in candidates):
            return True
    return False


# ---- YAML and schemas -------------------------------------------------------------------------------------------


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every object in deploy/k8s/*.yaml except the kustomization."""
    for f in sorted(K8S.glob("*.yaml")):
        if f.name != "kustomization.yaml":
            for d in yaml_docs(f):
                yield f, d


def k8s_object(kind: str) -> dict[str, Any]:
    found = [d for _, d in k8s_objects() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def schema_validator(name: str, fragment: str = "") -> jsonschema.Validator:
    """A Draft 2020-12 validator for tests/deploy/schemas/NAME (refs between the schema files resolve offline)."""
    resources = []
    for f in SCHEMAS.glob("*.json"):
        s = json.loads(f.read_text())
        resources.append((s["$id"], Resource.from_contents(s)))
    registry = Registry().with_resources(resources)
    schema = json.loads((SCHEMAS / name).read_text())
    if fragment:
        schema = {"$ref": schema["$id"] + "#" + fragment}
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)


# ---- PromQL -----------------------------------------------------------------------------------------------------

GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


def promql_selectors(expr: str) -> list[str]:
    """Metric names of the vector selectors in a PromQL expression (Grafana's $__ variables made concrete)."""
    for k, v in GRAFANA_VARS.items():
        expr = expr.replace(k, v)
    tree = promql_parser.parse(expr)  # raises ValueError on a syntax error
    names: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name or next((m.value for m in node.matchers.matchers if m.name == "__name__"), None)
            assert name, f"selector without a metric name in {expr!r}"
            names.append(name)
        return True

    promql_parser.walk(tree, visit)
    return names


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(where, expr) for every panel target and query variable of a Grafana dashboard JSON."""
    dash = json.loads(path.read_text())
    out = []

    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            out.append((f"panel {p['title']!r} {t['refId']}", t["expr"]))
    for v in dash.get("templating", {}).get("list", []):
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", q)
            if m:  # label_values(<series selector>, label): the selector is PromQL
                out.append((f"variable {v['name']}", m[1]))
    return out


def alert_rules(path: Path) -> list[dict[str, Any]]:
    """Rules of a Prometheus rule file ({groups: [{rules: [...]}]})."""
    return [r for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]


def all_queries() -> list[tuple[str, str]]:
    """Every PromQL expression the deployment files run: dashboard, alert rules, KEDA triggers."""
    qs = [(f"dashboard {w}", e) for w, e in dashboard_queries(ROOT / "deploy/grafana/dashboards/gam-serve.json")]
    qs += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules(ROOT / "deploy/prometheus/alerts.yml")]
    so = k8s_object("ScaledObject")
    qs += [
        (f"KEDA trigger {i}", t["metadata"]["query"])
        for i, t in enumerate(so["spec"]["triggers"])
        if t["type"] == "prometheus"
    ]
    return qs
