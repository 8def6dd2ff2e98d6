"""kd.errors.run_script: one line and an exit code, from rank 0 only under torchrun."""
import signal

import pytest

import kd.errors
from kd.errors import StopRequested, UserError, run_script


def ends(raised: Exception, rank: str, monkeypatch, capsys, world_size: str | None = "2"
         ) -> tuple[int, list[str]]:
    monkeypatch.setenv("RANK", rank)
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(kd.errors.signal, "signal", lambda *a: None)  # keep pytest's Ctrl-C

    def main():
        raise raised
    with pytest.raises(SystemExit) as exit_info:
        run_script(main)
    captured = capsys.readouterr()
    assert captured.out == ""
    return exit_info.value.code, captured.err.strip().splitlines()


@pytest.mark.parametrize("raised,code,line", [
    (UserError("bad flag"), 2, "error: bad flag"),
    (StopRequested("last.pt holds epoch 3"), 128 + signal.SIGTERM, "stopped: last.pt holds epoch 3"),
])
def test_rank_0_says_why_once_and_the_others_stay_silent(raised, code, line, monkeypatch, capsys):
    assert ends(raised, "0", monkeypatch, capsys) == (code, [line])
    assert ends(raised, "1", monkeypatch, capsys) == (code, [])


def test_a_stray_rank_variable_outside_torchrun_silences_nothing(monkeypatch, capsys):
    assert ends(UserError("bad flag"), "3", monkeypatch, capsys, world_size=None) == \
        (2, ["error: bad flag"])
