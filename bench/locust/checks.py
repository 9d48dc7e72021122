"""CI checks on a Locust run: ``--check-p99-us N`` and ``--check-fail-ratio F``.

Judged by the master (or the single process) when Locust quits, from the exact
figures: each operation's p99 from its HdrHistogram (in open loop, from the
intended start: the latency a user at that arrival rate sees), and failed
operations / operations, each publish, round trip or join counted once (by its
primary request, as Locust's own statistics count it; its stages are rows of the
Book only). A failed
check sets Locust's exit code to 3, as locust-plugins does; a run that measured
nothing fails a check rather than passing it.
"""
from __future__ import annotations

from .hdr import Book

EXIT_CODE = 3


def judge(book: Book, p99_us: float = 0.0, fail_ratio: float = -1.0) -> tuple[list, list]:
    """(failed, passed): one line per verdict."""
    failed, passed = [], []
    if p99_us and p99_us > 0:
        ops = [(key, row) for key, row in book.sorted_rows()
               if not key[2] and row.meta.get("primary", True)]
        if not ops:
            failed.append(f"p99 check: no operation was measured (limit {p99_us:,.0f} us)")
        for (request_type, name, _), row in ops:
            intended = book.rows.get((request_type, name, "intended"))
            use = intended if intended is not None and intended.hist.get_total_count() else row
            what = f"{request_type} {name!r}" + (" from intended start" if use is not row
                                                 else "")
            count = use.hist.get_total_count()
            if not count:
                failed.append(f"p99 check: {what} has no successful request")
                continue
            p99 = use.hist.get_value_at_percentile(99.0)
            line = f"p99 of {what} is {p99:,} us ({count:,} requests)"
            if p99 > p99_us:
                failed.append(f"{line} > {p99_us:,.0f} us")
            else:
                passed.append(f"{line} <= {p99_us:,.0f} us")
    if fail_ratio is not None and fail_ratio >= 0:
        ops, bad = book.operations()
        if not ops:
            failed.append(f"fail-ratio check: no operation was measured (limit {fail_ratio:g})")
        else:
            line = f"fail ratio {bad / ops:.4g} ({bad:,} of {ops:,} operations failed)"
            if bad / ops > fail_ratio:
                failed.append(f"{line} > {fail_ratio:g}")
            else:
                passed.append(f"{line} <= {fail_ratio:g}")
    return failed, passed
