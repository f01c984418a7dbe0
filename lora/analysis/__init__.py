"""Training-log analysis: the guide's metrics, verdicts, run comparisons, plots and reports.

Prefect-free; `tasks/results.py` and `animelora analyze` both call these functions.
"""
from __future__ import annotations

from lora.analysis.compare import Comparison, compare_runs, table_markdown, table_text
from lora.analysis.log import LogError, TrainingLog, load_log, parse_log
from lora.analysis.metrics import RunAnalysis, SeriesMetrics, Spike, analyze_log
from lora.analysis.plots import plot_comparison, plot_loss
from lora.analysis.report import json_safe, metrics_markdown, write_report

__all__ = [
    "Comparison", "LogError", "RunAnalysis", "SeriesMetrics", "Spike", "TrainingLog",
    "analyze_log", "compare_runs", "json_safe", "load_log", "metrics_markdown", "parse_log",
    "plot_comparison", "plot_loss", "table_markdown", "table_text", "write_report",
]
