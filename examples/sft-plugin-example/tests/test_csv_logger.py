"""The csv logger writes metrics.csv from a real tiny run and continues it on resume."""

import csv
import json

from sft.core import RunInfo
from sft.testing import train_tiny

from sft_plugin_example import csv_logger


def test_csv_logger_writes_the_runs_metrics(sft_plugin_manager, tiny_model_dir, tmp_path):
    sft_plugin_manager.register(csv_logger, "csv-logger")
    run = train_tiny(tmp_path / "run", tiny_model_dir, "loggers.enabled=[csv]", "data.test_size=2",
                     "training.eval_strategy=steps", "training.eval_steps=1")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [r["step"] for r in logged]
    assert any(r["loss"] for r in rows) and any(r["eval_loss"] for r in rows)  # a column added mid-run


def test_csv_logger_drops_rows_after_the_resumed_step(tmp_path):
    logger = csv_logger.CsvLogger()
    logger.start(RunInfo("r", str(tmp_path), {}))
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step})
    logger.start(RunInfo("r", str(tmp_path), {}, resumed_from_step=2))
    logger.log(3, {"loss": 0.3, "eval_loss": 0.4})
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in rows] == [("1", "1.0", ""), ("2", "0.5", ""), ("3", "0.3", "0.4")]
