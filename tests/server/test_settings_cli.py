"""One settings object: CLI flags and GAM_* env vars map onto the same fields; model directory resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from server import settings as settings_mod
from server.cli import parse
from server.settings import Settings


def test_flags(tmp_path: Path) -> None:
    s = parse(
        [
            "--model",
            str(tmp_path),
            "--host",
            "0.0.0.0",
            "--port",
            "9001",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--max-batch-size",
            "8",
            "--max-queue",
            "3",
            "--max-new-tokens",
            "50",
            "--max-input-tokens",
            "99",
            "--request-timeout",
            "2.5",
            "--api-key",
            "s3cret-key",
            "--no-cuda-graphs",
            "--shutdown-grace",
            "4",
            "--log-level",
            "debug",
        ]
    )
    assert s.model == tmp_path and (s.host, s.port, s.device) == ("0.0.0.0", 9001, "cpu")
    assert s.resolved_dtype() == torch.bfloat16 and s.max_batch_size == 8 and s.max_queue == 3
    assert (s.max_new_tokens, s.max_input_tokens, s.request_timeout) == (50, 99, 2.5)
    assert s.api_key is not None and s.api_key.get_secret_value() == "s3cret-key" and "s3cret" not in repr(s)
    assert s.cuda_graphs is False and s.shutdown_grace == 4 and s.log_level == "debug"


def test_env_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GAM_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("GAM_PORT", "8123")
    monkeypatch.setenv("GAM_CUDA_GRAPHS", "false")
    s = parse(["--port", "8124"])
    assert s.max_batch_size == 7 and s.port == 8124 and s.cuda_graphs is False


def test_defaults() -> None:
    s = Settings()
    assert (s.host, s.port, s.device, s.dtype) == ("127.0.0.1", 8000, "auto", "auto")
    assert s.api_key is None and s.cuda_graphs is True and s.fault_injection is None
    if not torch.cuda.is_available():
        assert s.resolved_device() == torch.device("cpu") and s.resolved_dtype() == torch.float32


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-batch-size", "0"],
        ["--port", "70000"],
        ["--dtype", "int8"],
        ["--device", "tpu9"],
        ["--request-timeout", "-1"],
        ["--stream-interval-ms", "50"],  # without --stream-interval > 1 it would do nothing
    ],
)
def test_bad_flags_exit(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        from server.cli import main

        main(argv)


def test_model_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings_mod, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(ValueError, match="no model"):
        Settings().resolved_model_dir()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    assert Settings().resolved_model_dir() == tmp_path / "a"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="2 models"):
        Settings().resolved_model_dir()
    assert Settings(model=tmp_path / "b").resolved_model_dir() == tmp_path / "b"


@pytest.mark.parametrize("key", ["", "   ", "s3cret\n", " s3cret", "s3cret\t", "s3c\rret", "s3c\x00ret"])
def test_an_api_key_no_header_can_carry_is_refused(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An HTTP header value has no leading or trailing whitespace and no control characters, so a key with them can
    never be sent (a k8s Secret made with --from-file keeps the file's newline: every call got 401), and an empty key
    let in any `Authorization: Bearer` with no token: refused at start-up (exit 2), from the flag and the env."""
    with pytest.raises(ValueError, match="api_key"):
        Settings(api_key=key)
    if "\x00" in key:  # an environment variable cannot hold one
        return
    monkeypatch.setenv("GAM_API_KEY", key)
    with pytest.raises(SystemExit) as e:
        from server.cli import main

        main([])
    assert e.value.code == 2


def test_an_api_key_with_inner_spaces_is_kept() -> None:
    """Inner spaces and tabs can be sent (`Authorization: Bearer a b`): such a key stays as given."""
    key = Settings(api_key="two words\tand a tab").api_key
    assert key is not None and key.get_secret_value() == "two words\tand a tab"


@pytest.mark.parametrize(
    ("env_key", "argv"),
    [
        ("topsecret-key", ["--stream-interval-ms", "50"]),  # a bad combination: pydantic quoted every input given
        ("topsecret-key\n", []),  # the key itself refused
        ("topsecret-key", ["--max-batch-size", "0"]),
    ],
)
def test_bad_settings_never_print_the_api_key(
    env_key: str, argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """gam-serve's message for bad settings names what is wrong, never the values given: pydantic's own text
    quotes the input (a model-level error the whole input dict, API key included) into the container's log."""
    monkeypatch.setenv("GAM_API_KEY", env_key)
    with pytest.raises(SystemExit) as e:
        from server.cli import main

        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "topsecret" not in err, err
    assert err.startswith("gam-serve: ") and ("stream-interval" in err or "api_key" in err or "max_batch_size" in err)


@pytest.mark.parametrize("damage", ["missing", "not json"])
def test_a_checkpoint_without_a_usable_tokenizer_exits_with_the_reason(
    checkpoint_dir: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint directory whose tokenizer.json is missing or unreadable stops gam-serve at start-up with exit 2
    and the file named: the frontend read the tokenizer before the engine core's checks ran, so the answer was a
    traceback ending in the tokenizers library's "No such file or directory (os error 2)" and exit status 3."""
    model = tmp_path / "model"
    shutil.copytree(checkpoint_dir, model)
    if damage == "missing":
        (model / "tokenizer.json").unlink()
    else:
        (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        from server.cli import main

        main(["--model", str(model), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "tokenizer.json" in err and str(model) in err, err


@pytest.mark.parametrize("argv", [["--api_key=topsecret-key"], ["--apikey", "topsecret-key"], ["topsecret-key"]])
def test_a_mistyped_flag_never_prints_its_value(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's error for arguments gam-serve does not know quotes each one, so a mistyped --api-key put the key
    into stderr (the container log): the message names the flags, not their values, and still exits 2."""
    from server.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "topsecret" not in err and "unrecognized arguments:" in err, err
    assert argv[0].startswith("topsecret") or argv[0].split("=")[0] in err
