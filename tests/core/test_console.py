"""Long runs you can watch: plain progress lines off a terminal, quiet third-party loggers, TensorBoard scalars,
``dinoscope --version``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.cli import main
from core.logging import PlainProgress, progress, setup_logging

ROOT = Path(__file__).resolve().parents[2]


def test_off_a_terminal_progress_is_plain_lines_with_rate_and_eta(monkeypatch, caplog) -> None:
    monkeypatch.delenv("DINOSCOPE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("DINOSCOPE_PROGRESS", "plain")
    caplog.set_level(logging.INFO, logger="dinoscope.progress")
    bar = progress(range(10), total=10, desc="pretrain", unit="it")
    assert isinstance(bar, PlainProgress)
    for i in bar:
        if i == 3:
            bar.set_postfix(loss="5.123", lr="1.00e-03")
    lines = [r.getMessage() for r in caplog.records if r.name == "dinoscope.progress"]
    assert lines[0].startswith("pretrain 4/10 (40%) loss=5.123 lr=1.00e-03 | ") and "it/s, ETA" in lines[0]
    assert "\r" not in "".join(lines)


def test_progress_can_be_turned_off(monkeypatch, caplog) -> None:
    monkeypatch.setenv("DINOSCOPE_PROGRESS", "off")
    monkeypatch.delenv("DINOSCOPE_NO_PROGRESS", raising=False)
    caplog.set_level(logging.INFO)
    bar = progress(range(3), total=3, desc="quiet")
    for _ in bar:
        bar.set_postfix(x=1)
    assert not [r for r in caplog.records if r.name == "dinoscope.progress"]


def test_third_party_info_is_silenced_unless_verbose(caplog) -> None:
    caplog.set_level(logging.NOTSET)
    setup_logging(logging.INFO)
    logging.getLogger("copairs").info("matching pairs")
    logging.getLogger("core.train").info("ours")
    logging.getLogger("deepspeed").warning("a warning still shows")
    messages = [r.getMessage() for r in caplog.records]
    assert "ours" in messages and "a warning still shows" in messages and "matching pairs" not in messages
    setup_logging(logging.DEBUG)
    logging.getLogger("copairs").info("now visible")
    assert "now visible" in [r.getMessage() for r in caplog.records]
    setup_logging(logging.INFO)


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("dinoscope ")


def test_tensorboard_scalars_from_the_recipe(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    argv = [
        "pretrain",
        str(ROOT / "recipes" / "tiny" / "pretrain.yaml"),
        "--output-dir",
        str(tmp_path / "run"),
        "train.max_iters=2",
        "optim.epoch_length=2",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "teacher.warmup_teacher_temp_epochs=0",
        "optim.freeze_last_layer_epochs=0",
        "train.num_workers=0",
        "train.log_every=1",
        "train.tensorboard=true",
    ]
    assert main(argv) == 0
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = events.Scalars("loss/total")
    assert [e.step for e in losses] == [1, 2] and all(e.value > 0 for e in losses)
    assert "lr" in events.Tags()["scalars"]
