"""Each histogram's percentile distribution in HdrHistogram's own text format (``.hgrm``):
the ``Value Percentile TotalCount 1/(1-Percentile)`` table and its footer, as written by
``HdrHistogram.output_percentile_distribution``, which HdrHistogram's plotter
(``plotFiles.html``) and ``wrk2 -U`` users read. Values are in milliseconds, the unit the
plotter labels its axis with.

One file per histogram, in a folder: an ``.hgrm`` holds one distribution and has no
field for a name, so the cell and histogram go in the file name,
``<cell key>.<histogram>.hgrm`` (sanitised); the plotter takes several files and shows
each as a curve named by its file.

After the footer, one ``#[pNN ...]`` comment line per recorded percentile gives its sample
count and distribution-free 95% interval (:mod:`bench.percentiles`), or "too few samples
(n=30)"; readers of the format skip ``#`` lines.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from .. import percentiles, results

TO_MS = {"ns": 1e6, "us": 1e3, "ms": 1.0, "s": 1e-3}    # value / ratio = milliseconds


def safe_name(text: str, limit: int = 180) -> str:
    """``publish[api=kombu,producer=held]`` -> ``publish_api=kombu_producer=held``: a file
    name without shell or path characters; a long one keeps a hash of the whole."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_.") or "cell"
    if len(name) > limit:
        name = name[:limit] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return name


def distribution(summary: dict) -> str:
    """One histogram summary as ``.hgrm`` text."""
    hist = results.decode(summary)
    ratio = TO_MS.get(summary.get("unit", "us"), 1e3)
    buf = io.BytesIO()
    hist.output_percentile_distribution(buf, ratio)
    text = buf.getvalue().decode("ascii")
    # hdrh 0.10 prints the standard deviation unscaled (the Java original divides it by
    # the ratio like every other value): the footer line again, in hdrh's own format.
    line = "#[Mean    = %12.{0}f, StdDeviation   = %12.{0}f]".format(hist.significant_figures) \
        % (hist.get_mean_value() / ratio, hist.get_stddev() / ratio)
    text = re.sub(r"^#\[Mean .*$", lambda _: line, text, count=1, flags=re.M)
    return text + "".join(_interval_line(summary, name, ratio) + "\n"
                          for name in percentiles.NAMES)


def _interval_line(summary: dict, name: str, ratio: float) -> str:
    p = percentiles.of_summary(summary, name)
    label = f"p{p.pct:g}"
    if not p.enough:
        return f"#[{label} = {p.too_few}]"
    return (f"#[{label} = {p.value / ratio:.3f} ms, 95% interval {p.lo / ratio:.3f}-"
            f"{p.hi / ratio:.3f} ms, n={p.n} (order statistics)]")


def hgrm(run: results.Run, folder, hist_names=None) -> list[Path]:
    """Write ``<folder>/<cell>.<histogram>.hgrm`` for every recorded histogram of every
    ok cell; returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written, used = [], set()
    for cell in run.cells:
        if cell.status != "ok":
            continue
        for name, summary in cell.histograms.items():
            if (hist_names and name not in hist_names) or not summary.get("count") \
                    or not summary.get("hdr"):
                continue
            stem = f"{safe_name(cell.key)}.{safe_name(name)}"
            unique, n = stem, 2
            while unique in used:
                unique, n = f"{stem}-{n}", n + 1
            used.add(unique)
            path = folder / f"{unique}.hgrm"
            path.write_text(distribution(summary))
            written.append(path)
    if not written:
        raise ValueError("no recorded histogram to write (check --cell / --hist)")
    return written
