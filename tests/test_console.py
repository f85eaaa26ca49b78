"""The quiet console (pneumo_ray.console): one progress line, worker lines filtered to ours."""

from __future__ import annotations

import io

from pneumo_ray.console import JobLog, Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_prints_done_rate_and_eta_every_interval_off_a_terminal():
    clock, out = _Clock(), io.StringIO()
    progress = Progress("scoring", 1000, stream=out, every_s=30, clock=clock)
    clock.now = 10
    progress.update(100)  # before the interval: nothing yet
    assert out.getvalue() == ""
    clock.now = 40
    progress.update(300)
    line = out.getvalue().strip()
    assert "400/1,000 images (40%)" in line and "10.0 images/s" in line and "ETA 0:01:00" in line
    clock.now = 100
    progress.update(600)
    progress.close()
    last = out.getvalue().strip().splitlines()[-1]
    assert "1,000/1,000 images (100%)" in last and "ETA 0:00:00" in last
    assert "[" + "#" * 24 + "]" in last


def test_progress_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock, out = _Clock(), Terminal()
    progress = Progress("scoring", 10, stream=out, clock=clock)
    for _ in range(10):
        clock.now += 1
        progress.update(1)
    progress.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 11 and "10/10 images" in text


def test_worker_lines_go_to_the_file_and_only_ours_to_a_quiet_console(tmp_path, capsys):
    log = JobLog("train", verbose=False, path=str(tmp_path / "job.log"))
    log._worker_lines(
        {
            "pid": 42,
            "task_name": "train_fn",
            "is_err": False,
            "lines": [
                "[binary] epoch 1/4 train_loss=0.7 val_loss=0.3",
                "INFO streaming_executor.py:371 -- Dataset execution finished",
                "[pneumo_ray] model actor ready on node n1 (cpu)",
            ],
        }
    )
    shown = capsys.readouterr().out.splitlines()
    assert shown == [
        "[binary] epoch 1/4 train_loss=0.7 val_loss=0.3",
        "[pneumo_ray] model actor ready on node n1 (cpu)",
    ]
    written = (tmp_path / "job.log").read_text()
    assert "(train_fn pid=42) INFO streaming_executor.py" in written
    assert written.count("pid=42") == 3
