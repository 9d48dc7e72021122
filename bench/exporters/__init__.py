"""Export a results run, one module per format (hyperfine's habit):

* ``md``   (:mod:`.markdown`) - the tables of ``celery-bench show`` as GitHub markdown;
* ``csv``  (:mod:`.csv`)      - one row per cell: params, metrics with their spread,
                                histogram percentiles; units in the header;
* ``png``  (:mod:`.png`)      - latency percentile spectra (faceted, one chart per
                                histogram kind);
* ``hgrm`` (:mod:`.hgrm`)     - each histogram's percentile distribution, the text format
                                of HdrHistogram's plotter and ``wrk2 -U``, a file each;
* ``hlog`` (:mod:`.hlog`)     - interval histograms as one HdrHistogram log, a tag per
                                cell and histogram;
* ``html`` (:mod:`.html`)     - one self-contained page: tables, charts, environment;
                                with two runs, a comparison.

``celery-bench report RESULTS [NEW] --format md|csv|png|hgrm|hlog|html [--out PATH]``.
"""
from __future__ import annotations

from .charts import percentile_curve
from .csv import csv
from .hgrm import hgrm
from .hlog import hlog
from .html import compare_html, html, write_compare_html, write_html
from .markdown import markdown
from .png import png

TEXT_FORMATS = {"md": markdown, "csv": csv}
FORMATS = ("md", "csv", "png", "hgrm", "hlog", "html")

__all__ = ["FORMATS", "TEXT_FORMATS", "markdown", "csv", "png", "hgrm", "hlog", "html",
           "compare_html", "write_html", "write_compare_html", "percentile_curve"]
