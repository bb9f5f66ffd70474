"""The command line's entry points: `python -m sftlab`, and errors that need no heavy library."""

from __future__ import annotations

import os
import subprocess
import sys

_NO_DATA = """
import sys
from sftlab.cli import main
code = main(["train", "--output-dir", sys.argv[1]])
print("torch loaded:", "torch" in sys.modules, "exit:", code)
"""


def test_python_dash_m_sftlab_is_the_command_line():
    out = subprocess.run([sys.executable, "-m", "sftlab", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: sftlab")
    assert "train" in out.stdout and "doctor" in out.stdout


def test_train_without_data_says_so_before_loading_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", _NO_DATA, str(tmp_path / "run")], capture_output=True, text=True,
                         timeout=120)
    assert out.stderr.strip().splitlines() == [
        "sftlab train: error: no training data given (pass --data FILE or set `data:` in the config)"]
    assert out.stdout.strip() == "torch loaded: False exit: 2"
    assert not (tmp_path / "run").exists()


def test_doctor_into_a_closed_pipe_stops_quietly(tmp_path):
    # `sftlab doctor data.jsonl | head -1`: the reader leaves before the report is printed.
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n', encoding="utf-8")
    r, w = os.pipe()
    os.close(r)  # nobody reads: the first write fails with EPIPE
    try:
        out = subprocess.run([sys.executable, "-m", "sftlab", "doctor", str(data)], stdout=w,
                             stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(w)
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
    assert out.returncode == 141


def test_output_piped_to_a_reader_that_stops_early_is_no_traceback():
    # `sftlab recommend ... | head -1`: head exits after one line and the next print raised BrokenPipeError
    proc = subprocess.Popen([sys.executable, "-m", "sftlab", "recommend", "--examples", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
