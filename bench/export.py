"""Kept for importers of the single-module exporter: the formats live in
:mod:`bench.exporters`, one module each."""
from .exporters import (FORMATS, TEXT_FORMATS, compare_html, csv, hgrm, hlog, html,  # noqa: F401
                        markdown, percentile_curve, png, write_compare_html, write_html)
from .exporters.charts import PERCENTILE_TICKS  # noqa: F401
