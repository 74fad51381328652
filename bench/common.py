"""Shared by the bench scripts: the machine description, the model to serve, a gam-serve subprocess."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, cores, bf16 support, torch version and threads."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in info,
        "amx_bf16": "amx_bf16" in info,
        "python": platform.python_version(),
    }


def process_cpu_seconds(pid: int, system: bool = False) -> float:
    """User + system CPU seconds of a process (Linux /proc/PID/stat fields 14 and 15); system: field 15 alone (time
    in the kernel: syscalls such as socket writes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[12]) if system else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def process_tree_cpu(pid: int, system: bool = False) -> dict[int, tuple[str, float]]:
    """{pid: (name, process_cpu_seconds)} of a process and all its live descendants (the engine core is a child);
    system: the kernel's part only."""
    import psutil

    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(OSError, psutil.Error):  # exited meanwhile
            out[p.pid] = (p.name(), process_cpu_seconds(p.pid, system))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """process_cpu_seconds of a process and all its live descendants (the engine core is a child process)."""
    return sum(seconds for _, seconds in process_tree_cpu(pid).values())


def listening_port(proc: subprocess.Popen | int, timeout: float) -> int | None:
    """The TCP port a server process started on port 0 listens on, once it does (the kernel picked a free port for
    the server's own socket, so no other process can take it first, as one can take a port picked free here, closed
    and passed on); None if the process exits or does not listen within `timeout` seconds. proc: a child of this
    process, or the pid of another's (bench/gpu_check.sh's server, a child of its shell)."""
    import psutil

    def alive() -> bool:
        if isinstance(proc, subprocess.Popen):
            return proc.poll() is None
        with contextlib.suppress(psutil.Error):
            return psutil.Process(proc).status() != psutil.STATUS_ZOMBIE
        return False

    pid = proc.pid if isinstance(proc, subprocess.Popen) else proc
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):  # exited meanwhile: alive() says so
            conns = psutil.Process(pid).net_connections("tcp")
            ports = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
            if ports:
                (port,) = ports  # a server with two listeners would need saying which one
                return port
        time.sleep(0.05)
    return None


PROMPTS = Path(__file__).resolve().parent.parent / "load_tests" / "prompts.txt"  # WikiText-2 excerpt


def prompt_corpus() -> str:
    """The load generator's prompt file as one text (comment lines dropped)."""
    return " ".join(ln for ln in PROMPTS.read_text().splitlines() if not ln.startswith("#"))


def served_model(given: Path | None, tmp: Path) -> tuple[Path, str]:
    """The checkpoint a benchmark serves and where it came from: --model, else the bundled model, else the paper
    config with random weights written under tmp."""
    if given is not None:
        return given, "given (--model)"
    bundled = bundled_model_dir()
    if bundled is not None:
        return bundled, "bundled"
    return random_paper_checkpoint(tmp / "gam-random"), "paper config, random weights"


def bundled_model_dir() -> Path | None:
    """The single model under weights/ (the bundled default), if it has landed."""
    found = sorted(p.parent for p in (Path(__file__).resolve().parent.parent / "weights").glob("*/config.json"))
    return found[0] if len(found) == 1 else None


def random_paper_checkpoint(directory: Path, tokenizer_of: Path | None = None, **config: int) -> Path:
    """A checkpoint of the paper's GAM config (fields overridden by `config`) with random weights, and the tokenizer
    (with its special tokens) of checkpoint `tokenizer_of`, else a byte-level BPE trained on the load_tests prompt
    excerpt; vocab_size = that tokenizer's size, so every sampled id decodes."""
    from gam_model.checkpoint import CheckpointMeta, read_config, save_checkpoint
    from gam_model.config import GAMConfig
    from gam_model.data import train_tokenizer
    from gam_model.model import GAM
    from gam_model.tokenizer import Tokenizer

    if tokenizer_of is None:
        tok = train_tokenizer([PROMPTS], "bytelevel", vocab_size=10000)
        meta = CheckpointMeta(model_name="gam-paper-config-random", eos_token_id=tok.eos_token_id)
    else:
        _, src = read_config(tokenizer_of)
        tok = Tokenizer.from_file(tokenizer_of / "tokenizer.json", src.eos_token_id, src.bos_token_id)
        meta = CheckpointMeta(
            model_name="gam-random",
            eos_token_id=src.eos_token_id,
            bos_token_id=src.bos_token_id,
            special_tokens=dict(src.special_tokens),
        )
    torch.manual_seed(0)
    model = GAM(GAMConfig(**{**config, "vocab_size": tok.vocab_size}, dropout=0.0)).eval()
    return save_checkpoint(directory, model, tok, meta)


SERVE = "import sys; from server.cli import main; main(sys.argv[1:])"  # gam-serve, from this checkout


def serve_help() -> str:
    """The text of `gam-serve --help` (which flags this server has)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", SERVE, "--help"], cwd=root, capture_output=True, text=True, timeout=120
    )
    return done.stdout


class ServerProcess:
    """`gam-serve` in a subprocess on 127.0.0.1 at a port the kernel picks (--port 0, which every checkout accepts); a
    context manager that waits for /health. `checkout`: serve that checkout's code (another commit's worktree) instead
    of this one's."""

    def __init__(self, model_dir: Path, threads: int = 1, checkout: Path | None = None, **settings: object) -> None:
        self.model_dir, self.threads, self.settings = model_dir, threads, settings
        self.checkout = checkout
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        args = ["--model", str(self.model_dir), "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
        for k, v in self.settings.items():
            flag = k.replace("_", "-")
            args += [f"--{flag}"] if v is True else [f"--no-{flag}"] if v is False else [f"--{flag}", str(v)]
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        root = Path(__file__).resolve().parent.parent
        if self.checkout is not None:
            root = self.checkout.resolve()
            env["PYTHONPATH"] = str(root)
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, *args], cwd=root, env=env)
        try:  # __exit__ does not run when __enter__ raises: whatever stops the wait (Ctrl-C), the server must not run on
            return self._wait()
        except BaseException:
            self.__exit__()
            raise

    def _wait(self) -> ServerProcess:
        """Until the server listens and answers /health 200 (RuntimeError if it exits or does not, in 300 s)."""
        assert self.proc is not None
        deadline = time.monotonic() + 300
        port = listening_port(self.proc, 300)
        if port is None:
            why = f"exited with {self.proc.returncode}" if self.proc.poll() is not None else "did not listen in 300 s"
            raise RuntimeError(f"gam-serve {why}")
        self.url = f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gam-serve exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("gam-serve did not become healthy in 300 s")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server has used so far: gam-serve and its children (the engine core), all
        their threads, from /proc."""
        assert self.proc is not None
        return tree_cpu_seconds(self.proc.pid)

    def info(self) -> dict:
        return httpx.get(self.url + "/info", timeout=10).json()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
