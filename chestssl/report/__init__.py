"""Report: result tables (Markdown + CSV), figures and ``reports/README.md``."""

from chestssl.report.build import build_report
from chestssl.report.figures import read_live_metrics
from chestssl.report.tables import format_interval

__all__ = ["build_report", "format_interval", "read_live_metrics"]
