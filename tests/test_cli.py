"""The command line: help for every subcommand, generate/chat over a tiny model, bench wiring,
and (slow) the embedded SmolLM2 answering a question through ``python -m miniyaie generate``."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from miniyaie import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBCOMMANDS = ["serve", "generate", "chat", "bench"]


def _run(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "miniyaie", *args], cwd=REPO, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_help_subprocess():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    for name in SUBCOMMANDS:
        assert name in r.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m miniyaie {command}")
    if command != "bench":  # bench runs benchmarks with their own fixed engine configs
        assert "--num-blocks" in out and "--no-prefix-cache" in out and "--policy" in out


def test_engine_config_from_args():
    import argparse

    parser = cli.add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", "m", "--device", "cpu", "--dtype", "float32", "--num-blocks", "64",
                              "--block-size", "8", "--max-num-seqs", "4", "--max-num-batched-tokens", "128",
                              "--no-prefix-cache", "--policy", "fcfs"])
    config = cli.engine_config_from_args(args)
    assert (config.model, config.device, config.dtype, config.num_blocks, config.block_size) == \
        ("m", "cpu", "float32", 64, 8)
    assert (config.max_num_seqs, config.max_num_batched_tokens, config.enable_prefix_cache,
            config.schedule_policy) == (4, 128, False, "fcfs")
    defaults = cli.engine_config_from_args(parser.parse_args(["--model", "m"]))
    assert defaults.block_size == 16 and defaults.enable_prefix_cache and defaults.num_blocks is None
    with pytest.raises(ValueError, match="block_size"):
        cli.engine_config_from_args(parser.parse_args(["--block-size", "3"]))


def test_bad_flag_values_exit_2(capsys):
    assert cli.main(["generate", "hi", "--model", "m", "--block-size", "3"]) == 2
    assert "block_size" in capsys.readouterr().err


def test_generate_streams_tiny_model(tiny_model_dir, capsys):
    rc = cli.main(["generate", "Hello there", "--model", tiny_model_dir("llama"), "--device", "cpu",
                   "--num-blocks", "64", "--max-tokens", "8", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.strip()) > 0
    assert "8 tokens in" in err  # the stats line goes to stderr, the text to stdout


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~10 s on 2 busy cores
def test_generate_subprocess_tiny_model(tiny_model_dir):
    r = _run("generate", "Hello there", "--model", tiny_model_dir("llama"), "--device", "cpu",
             "--num-blocks", "64", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "8 tokens in" in r.stderr


def test_generate_reads_stdin_and_chat_template(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 + 2?"))
    rc = cli.main(["generate", "--chat", "--system", "Be brief.", "--model", tiny_model_dir("llama"),
                   "--device", "cpu", "--num-blocks", "64", "--max-tokens", "3", "--temperature", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0 and out.endswith("\n") and "tokens in" not in err


def test_chat_repl_keeps_the_conversation(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nHow are you?\n/exit\nnever read\n"))
    rc = cli.main(["chat", "--model", tiny_model_dir("llama"), "--device", "cpu", "--num-blocks", "64",
                   "--max-tokens", "4", "--temperature", "0", "--verbose"])
    assert rc == 0
    err = capsys.readouterr().err
    stats = [line for line in err.splitlines() if "tokens in" in line]
    assert len(stats) == 2  # two answers; the blank line and the text after /exit are skipped
    assert " 0 prompt tokens cached" not in stats[1]  # turn two reuses turn one from the prefix cache


def test_serve_hands_flags_to_app_main(monkeypatch):
    seen = {}
    for name in ("MINIYAIE_API_KEY", "MINIYAIE_SERVED_MODEL_NAME"):
        # setenv first so monkeypatch records the original state and restores it after the test
        # (a bare delenv of an absent variable records nothing, and serve's values would leak)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(cli, "_load_app", lambda: lambda argv: seen.update(argv=argv))
    rc = cli.main(["serve", "--port", "9", "--api-key", "s3cret", "--served-model-name", "tiny",
                   "--model", "m", "--share"])
    assert rc == 0
    assert seen["argv"] == ["--port", "9", "--model", "m", "--share"]  # app.py's own flags pass through
    assert os.environ["MINIYAIE_API_KEY"] == "s3cret"  # create_api picks these up from the environment
    assert os.environ["MINIYAIE_SERVED_MODEL_NAME"] == "tiny"


def test_bench_missing_suite(capsys):
    assert cli.main(["bench", "--suite", "no_such_bench"]) == 2
    assert "no_such_bench.py is not there" in capsys.readouterr().err


def test_bench_forwards_arguments(tmp_path, monkeypatch):
    called = {}
    fake = type(sys)("benchmarks.fake_bench")
    fake.main = lambda argv: called.update(argv=argv)
    monkeypatch.setitem(sys.modules, "benchmarks.fake_bench", fake)
    monkeypatch.setattr(cli.os.path, "isfile", lambda p: p.endswith("fake_bench.py") or os.path.exists(p))
    assert cli.main(["bench", "--suite", "fake_bench", "--", "--only", "startup"]) == 0
    assert called["argv"] == ["--only", "startup"]


@pytest.mark.slow
def test_embedded_model_knows_paris():
    r = _run("generate", "What is the capital of France?", "--chat", "--temperature", "0",
             "--max-tokens", "24", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.slow  # a fresh interpreter + uvicorn start-up
def test_serve_api_only(tiny_model_dir):
    import signal
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-m", "miniyaie", "serve", "--api-only", "--port", str(port),
                             "--api-key", "k", "--model", tiny_model_dir("llama"), "--device", "cpu",
                             "--num-blocks", "64"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer k"},
                       json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
