"""Stopping nemoq while it writes, and two runs writing one output: real processes, real signals.

A run stopped by SIGTERM or SIGHUP (CI cancellations, `timeout`, container stops, closed
terminals) ends like Ctrl-C: one line, exit 128 + signal, nothing left in the output folder. A
run killed outright (SIGKILL, a power cut) leaves its partial folder, which the next run to the
same output removes, saying how many bytes it reclaimed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from nemoq import files
from tests.conftest import run_cli
from tests.fixtures.checkpoints import write_checkpoint

# ~75 MB of float32 weights: long enough to write (~0.5 s) to be caught mid-file.
WIDE = dict(hidden_size=512, moe_intermediate_size=512, moe_shared_expert_intermediate_size=512, n_routed_experts=16)
MID_WRITE = 1 << 20    # bytes in the partial file before we stop it


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("wide"), layout="hub", dtype="float32", config_overrides=WIDE)


def start_nemoq(*args, ignore_hangup: bool = False) -> subprocess.Popen:
    """nemoq in a child process with the stop signals at their defaults, even where the tests
    themselves run under nohup (an ignored SIGHUP is inherited, and nemoq then keeps ignoring it,
    as it should); `ignore_hangup` starts it as nohup would."""
    def signals():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN if ignore_hangup else signal.SIG_DFL)
    return subprocess.Popen([sys.executable, "-m", "nemoq.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=signals)


def partial_bytes(folder: Path) -> int:
    """Bytes in the partial folders there, -1 when there is none."""
    found = [p for p in folder.iterdir() if ".partial-" in p.name]
    return sum(f.stat().st_size for p in found for f in p.iterdir()) if found else -1


def wait_for(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"nemoq ended first (exit {proc.returncode}): {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "nemoq never got there"
        time.sleep(0.002)


def stop_with(proc: subprocess.Popen, signum: int, still_busy=lambda: True) -> tuple[int, str]:
    """Deliver `signum` while the process is held (SIGSTOP) at a known point, so the signal lands
    mid-run however fast the machine; returns (exit code, stderr)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert still_busy(), "nemoq got past the point before it was stopped"
        os.kill(proc.pid, signum)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def assert_one_line_interrupted(err: str, name: str) -> None:
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert lines == [f"interrupted by {name}: no output was written"], err
    assert "Traceback" not in err


@pytest.mark.parametrize("command, signum, exit_code", [
    (("convert", "--outtype", "f16"), signal.SIGTERM, 143),
    (("quantize", "--recipe", "Q4_K_M"), signal.SIGHUP, 129),
])
def test_stop_signal_mid_write_leaves_nothing(command, signum, exit_code, wide_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    proc = start_nemoq(command[0], wide_checkpoint, "-o", out, *command[1:])
    wait_for(proc, lambda: partial_bytes(tmp_path) > MID_WRITE)
    code, err = stop_with(proc, signum, still_busy=lambda: not out.exists())
    assert code == exit_code, err
    assert_one_line_interrupted(err, signal.Signals(signum).name)
    assert list(tmp_path.iterdir()) == []       # no output, no partial folder, no lock


def test_a_run_started_under_nohup_ignores_sighup_and_finishes(wide_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    proc = start_nemoq("convert", wide_checkpoint, "-o", out, "--outtype", "f16", ignore_hangup=True)
    wait_for(proc, lambda: partial_bytes(tmp_path) > MID_WRITE)
    code, err = stop_with(proc, signal.SIGHUP, still_busy=lambda: not out.exists())
    assert code == 0, err
    assert "interrupted" not in err
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_sigterm_during_calibration_leaves_nothing(tiny_model, tmp_path):
    # torch runs the forward pass in its own threads; the signal must still end it.
    out = tmp_path / "imatrix.gguf"
    proc = start_nemoq("calibrate", tiny_model, "-o", out)    # 65536 tokens: about 30 s on 2 cores
    lock = tmp_path / ".imatrix.gguf.lock"
    wait_for(proc, lock.exists)
    time.sleep(1.0)                              # into the forward pass
    code, err = stop_with(proc, signal.SIGTERM, still_busy=lambda: not out.exists())
    assert code == 143, err
    assert_one_line_interrupted(err, "SIGTERM")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_eval_writes_no_json_or_logits(tiny_gguf_f32, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"word{i % 97} and more text" for i in range(4000)))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    proc = start_nemoq("eval", tiny_gguf_f32, "--data", data, "--ctx", "64", "--json", outputs / "r.json",
                       "--save-logits", outputs / "base.npz")
    wait_for(proc, lambda: (outputs / ".r.json.lock").exists() and (outputs / ".base.npz.lock").exists())
    time.sleep(0.5)                              # into llama.cpp's chunks
    code, err = stop_with(proc, signal.SIGTERM, still_busy=lambda: not (outputs / "r.json").exists())
    assert code == 143, err
    assert_one_line_interrupted(err, "SIGTERM")
    assert list(outputs.iterdir()) == []


def test_next_run_removes_what_a_killed_run_left(wide_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    proc = start_nemoq("convert", wide_checkpoint, "-o", out, "--outtype", "f16")
    wait_for(proc, lambda: partial_bytes(tmp_path) > MID_WRITE)
    proc.kill()                                  # SIGKILL: no handler runs, no cleanup
    proc.communicate(timeout=60)
    left = partial_bytes(tmp_path)
    assert left > MID_WRITE and not out.exists()

    result = run_cli("convert", wide_checkpoint, "-o", out, "--outtype", "f16")
    assert result.exit_code == 0, result.output
    reclaimed = [line for line in result.output.splitlines() if "reclaimed" in line]
    assert len(reclaimed) == 1 and "removed 1 partial folder" in reclaimed[0], result.output
    reported = int(re.search(r"\(([\d,]+) bytes\) reclaimed", reclaimed[0]).group(1).replace(",", ""))
    assert left <= reported <= left + 4096       # the data, plus the tiny owner record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert len(gguf.GGUFReader(out).tensors) > 0


def test_partial_folders_of_live_runs_are_kept(random_hub, tmp_path):
    """Only folders whose owner is gone are removed: a live pid whose start time matches is a
    running writer (kept); a live pid with another start time was reused (removed); a dead pid
    is gone; another output's folders are not ours to touch."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        boot = files._boot_id()
        folders = {
            "dead": (f"{dead.pid} {boot} -", 3_000_000),
            "live": (f"{live.pid} {boot} {files._start_time(live.pid)}", 1000),
            "reused": (f"{live.pid} {boot} 1", 2000),
            "rebooted": (f"{live.pid} another-boot {files._start_time(live.pid)}", 4000),
        }
        for name, (owner, size) in folders.items():
            folder = tmp_path / f".out.gguf.partial-{name}"
            folder.mkdir()
            (folder / files.OWNER).write_text(owner + "\n")
            (folder / "out.gguf").write_bytes(b"\0" * size)
        other = tmp_path / ".other.gguf.partial-dead"
        other.mkdir()
        (other / files.OWNER).write_text(f"{dead.pid} {boot} -\n")

        result = run_cli("convert", random_hub, "-o", tmp_path / "out.gguf")
        assert result.exit_code == 0, result.output
        expected = sum(size + len(owner) + 1 for n, (owner, size) in folders.items() if n != "live")
        assert "removed 3 partial folders" in result.output and f"({expected:,} bytes)" in result.output
        assert sorted(p.name for p in tmp_path.iterdir()) == [".other.gguf.partial-dead", ".out.gguf.partial-live",
                                                               "out.gguf"]
    finally:
        live.kill()
        live.wait()


def test_two_runs_writing_one_output(wide_checkpoint, tmp_path):
    out = tmp_path / "model.gguf"
    first = start_nemoq("convert", wide_checkpoint, "-o", out, "--outtype", "f16")
    wait_for(first, lambda: partial_bytes(tmp_path) > MID_WRITE)
    os.kill(first.pid, signal.SIGSTOP)           # held mid-write while the second one runs
    try:
        second = start_nemoq("convert", wide_checkpoint, "-o", out, "--outtype", "f32", "--force")
        _, err = second.communicate(timeout=60)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"another nemoq run (pid {first.pid}) is writing this output" in errors[0], err
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]
    assert len(gguf.GGUFReader(out).tensors) > 0


def test_an_output_is_free_again_once_its_run_ends(random_hub, tmp_path):
    """In one process: the lock is released (and its file removed) after success and failure alike."""
    out = tmp_path / "out.gguf"
    assert run_cli("convert", random_hub, "-o", out).exit_code == 0
    assert run_cli("convert", random_hub, "-o", out).exit_code == 1            # exists, no --force
    assert run_cli("convert", random_hub, "-o", out, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf"]


def test_a_signal_handled_inside_a_c_callback_still_stops_the_command(capfd):
    """llama.cpp calls nemoq's log callback (through ctypes) for every line while a model loads;
    a signal handled in there raises where ctypes prints and drops the exception. The signal is
    sent again, and raised once Python runs outside the callback. libc's qsort stands for
    llama.cpp: C calling a Python function many times."""
    import ctypes
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    calls = []

    def in_c_callback(a, b):
        calls.append(1)
        if len(calls) == 100:
            os.kill(os.getpid(), signal.SIGTERM)
        return 0
    values = (ctypes.c_int * 5000)()
    with files.command_scope():
        with pytest.raises(files.Interrupted) as stopped:
            ctypes.CDLL(None).qsort(values, len(values), ctypes.sizeof(ctypes.c_int), compare(in_c_callback))
            assert len(calls) > 100                     # the sort went on: the exception was dropped
            time.sleep(5)                               # ... and comes back here
        assert stopped.value.signum == signal.SIGTERM
    assert "Exception ignored" not in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # restored after the command


def test_where_nothing_can_be_locked_only_recorded_dead_owners_go(random_hub, tmp_path, monkeypatch):
    """A filesystem without flock: the run goes on unlocked, and a folder with no owner record
    yet may be a run that is just starting, so it stays."""
    def no_flock(fd, operation):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    starting = tmp_path / ".out.gguf.partial-starting"
    starting.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone = tmp_path / ".out.gguf.partial-gone"
    gone.mkdir()
    (gone / files.OWNER).write_text(f"{dead.pid} {files._boot_id()} -\n")
    result = run_cli("convert", random_hub, "-o", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    assert "removed 1 partial folder " in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.gguf.partial-starting", "out.gguf"]


def test_a_signal_the_moment_the_partial_folder_exists_leaves_nothing(tmp_path, monkeypatch):
    """The stop signal lands right after the partial folder is made (where a stopped-and-signalled
    run was once caught under load): the folder is still removed."""
    made = files.tempfile.mkdtemp

    def mkdtemp_then_signal(*args, **kwargs):
        path = made(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return path
    monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp_then_signal)
    with files.command_scope():
        with pytest.raises(files.Interrupted):
            with files.atomic_outputs(tmp_path / "out.gguf", force=False) as partial:
                partial.write_bytes(b"never")
    assert list(tmp_path.iterdir()) == []
