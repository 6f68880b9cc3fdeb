"""From raw measurements to the results table: medians, pairwise ratios, targets, verdicts.

A ratio is computed run by run (run i of the router against run i of its baseline), and the
median of those ratios is reported, so slow and fast phases of a noisy machine cancel out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .corpus import Corpus
from .scenarios import Measurement, Settings

P3_NOT_IMPLEMENTED = "n/a (DICOMweb destination not implemented yet)"
TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "P1": ("≥ 1.0×", lambda r: r >= 1.0),
    "P2": ("≤ 0.5×", lambda r: r <= 0.5),
    "P2i": ("≤ 0.3×", lambda r: r <= 0.3),  # issue 25: forward while receiving
    "P3": ("≥ 1.0×", lambda r: r >= 1.0),
    "P4": ("≤ 100 MB", lambda v: v <= 100.0),  # issue 25 (was 200 MB)
    "P5": ("≥ 1.8×", lambda r: r >= 1.8),
}
Runs = Sequence[dict[str, Measurement]]


@dataclass
class Row:
    """One line of the results table (``values`` holds the medians as numbers)."""

    id: str
    measurement: str
    router: str
    baseline: str
    ratio: str = "-"
    target: str = "-"
    verdict: str = "-"
    values: dict[str, float | None] = field(default_factory=dict)


def median(values: Iterable[float]) -> float | None:
    """Median, or None for no values."""
    vals = list(values)
    return statistics.median(vals) if vals else None


def _ok(m: Measurement | None) -> bool:
    return m is not None and "error" not in m


def _series(runs: Runs, key: str, fn: Callable[[Measurement], float]) -> list[float]:
    """``fn`` of measurement ``key`` in every run where it succeeded."""
    return [fn(r[key]) for r in runs if _ok(r.get(key))]


def _ratios(runs: Runs, num: str, den: str, fn: Callable[[Measurement], float]) -> list[float]:
    """Per-run ratios ``fn(num) / fn(den)`` for the runs where both succeeded."""
    return [fn(r[num]) / fn(r[den]) for r in runs
            if _ok(r.get(num)) and _ok(r.get(den)) and fn(r[den]) > 0]


def rate(m: Measurement) -> float:
    """Instances per second."""
    return float(m["instances"]) / float(m["seconds"])


def mbps(m: Measurement) -> float:
    """MB (10^6 bytes) per second."""
    return float(m["bytes"]) / 1e6 / float(m["seconds"])


def _failed(runs: Runs, key: str) -> str | None:
    """The first error of ``key``, if it failed in every run it was attempted."""
    attempts = [r[key] for r in runs if key in r]
    if attempts and not any(_ok(m) for m in attempts):
        return f"error: {attempts[0]['error']}"
    return None


def _cpu_per_1000(m: Measurement) -> float:
    """CPU seconds of the receiver (and its processes) per 1000 instances received."""
    return float(m["cpu_seconds"]) * 1000.0 / float(m["instances"])


def _series_cpu(runs: Runs, key: str) -> list[float]:
    return [_cpu_per_1000(r[key]) for r in runs if _ok(r.get(key)) and "cpu_seconds" in r[key]]


def _throughput(runs: Runs, key: str) -> tuple[str, float | None]:
    inst = median(_series(runs, key, rate))
    if inst is None:
        return _failed(runs, key) or "-", None
    mb = median(_series(runs, key, mbps))
    return f"{inst:.0f} inst/s, {mb:.1f} MB/s", inst


def _seconds(runs: Runs, key: str) -> tuple[str, float | None]:
    sec = median(_series(runs, key, lambda m: float(m["seconds"])))
    if sec is None:
        return _failed(runs, key) or "-", None
    return f"{sec:.2f} s", sec


def _verdict(scenario: str, value: float | None) -> tuple[str, str]:
    target, check = TARGETS[scenario]
    if value is None:
        return target, "n/a"
    return target, "met" if check(value) else "not met"


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}×"


def build_rows(settings: Settings, runs: Runs, dicomweb_available: bool = False) -> list[Row]:
    """The table: one or more rows for each of P1-P5 (``not run`` when not selected)."""
    rows: list[Row] = []
    selected = settings.scenarios

    def skipped(scenario: str, what: str, why: str = "not run (--only)") -> None:
        rows.append(Row(scenario, what, why, "-", verdict="-"))

    # P1: receive throughput, one association
    if "P1" in selected:
        for c in ("small", "ct"):
            router, r_val = _throughput(runs, f"P1/{c}/router")
            base, _ = _throughput(runs, f"P1/{c}/storescp")
            ratio = median(_ratios(runs, f"P1/{c}/router", f"P1/{c}/storescp", rate))
            target, verdict = _verdict("P1", ratio)
            rows.append(Row("P1", f"receive {c}, 1 association", router,
                            f"storescp {base}", _fmt_ratio(ratio), target, verdict,
                            {"router_inst_s": r_val, "ratio": ratio}))
        if any("P1/small/router-slots" in run for run in runs):
            for c in ("small", "ct"):
                router, r_val = _throughput(runs, f"P1/{c}/router-slots")
                base, _ = _throughput(runs, f"P1/{c}/storescp")
                ratio = median(_ratios(runs, f"P1/{c}/router-slots", f"P1/{c}/storescp", rate))
                target, verdict = _verdict("P1", ratio)
                rows.append(Row("P1", f"receive {c}, 1 association, receive_log: false (slots)",
                                router, f"storescp {base}", _fmt_ratio(ratio), target, verdict,
                                {"router_inst_s": r_val, "ratio": ratio}))
        if any("P1/small/router-tls" in run for run in runs):
            router, r_val = _throughput(runs, "P1/small/router-tls")
            base, _ = _throughput(runs, "P1/small/storescp-tls")
            ratio = median(_ratios(runs, "P1/small/router-tls", "P1/small/storescp-tls", rate))
            target, verdict = _verdict("P1", ratio)
            rows.append(Row("P1", "receive small over DICOM TLS, 1 association", router,
                            f"storescp +tls {base}", _fmt_ratio(ratio), target, verdict,
                            {"router_inst_s": r_val, "ratio": ratio}))
        if settings.orthanc:
            for c in ("small", "ct"):
                router, r_val = _throughput(runs, f"P1/{c}/router")
                base, b_val = _throughput(runs, f"P1/{c}/orthanc")
                ratio = median(_ratios(runs, f"P1/{c}/router", f"P1/{c}/orthanc", rate))
                rows.append(Row("P1", f"receive {c}: vs Orthanc (reference)", router,
                                f"Orthanc {base}", _fmt_ratio(ratio),
                                values={"orthanc_inst_s": b_val, "ratio": ratio}))
    else:
        skipped("P1", "receive throughput, 1 association")

    # P2: end to end, router vs an Orthanc gateway (Lua OnStableStudy)
    if "P2" in selected and not settings.orthanc:
        skipped("P2", "end to end into Orthanc", "n/a (Orthanc not installed)")
    elif "P2" in selected:
        for c in ("small", "ct"):
            router, r_val = _seconds(runs, f"P2/{c}/router")
            base, b_val = _seconds(runs, f"P2/{c}/gateway")
            sec = lambda m: float(m["seconds"])  # noqa: E731
            ratio = median(_ratios(runs, f"P2/{c}/router", f"P2/{c}/gateway", sec))
            target, verdict = _verdict("P2", ratio)
            rows.append(Row("P2", f"end to end {c} → Orthanc (minus stable age; router: "
                            f"{settings.forward_associations} association(s))", router,
                            f"Orthanc gateway {base}", _fmt_ratio(ratio), target, verdict,
                            {"router_s": r_val, "gateway_s": b_val, "ratio": ratio}))
            if not any(f"P2/{c}/router-immediate" in r for r in runs):
                continue
            now, n_val = _seconds(runs, f"P2/{c}/router-immediate")
            ratio = median(_ratios(runs, f"P2/{c}/router-immediate", f"P2/{c}/gateway", sec))
            target, verdict = _verdict("P2i", ratio)
            rows.append(Row("P2", f"end to end {c} → Orthanc, forward: immediate (router: "
                            "nothing subtracted; gateway: minus stable age)", now,
                            f"Orthanc gateway {base}", _fmt_ratio(ratio), target, verdict,
                            {"router_s": n_val, "gateway_s": b_val, "ratio": ratio}))
    else:
        skipped("P2", "end to end into Orthanc")

    # P3: STOW-RS ingest against C-STORE ingest into the router, MB/s
    if "P3" in selected and any("P3/ct/stow-in" in r for r in runs):
        stow, s_val = _throughput(runs, "P3/ct/stow-in")
        cstore, c_val = _throughput(runs, "P3/ct/cstore-in")
        ratio = median(_ratios(runs, "P3/ct/stow-in", "P3/ct/cstore-in", mbps))
        target, verdict = _verdict("P3", ratio)
        rows.append(Row("P3", "STOW-RS ingest vs C-STORE ingest (ct, one request vs one "
                        "association, MB/s)", stow, f"C-STORE {cstore}", _fmt_ratio(ratio),
                        target, verdict, {"stow_in_inst_s": s_val, "cstore_in_inst_s": c_val,
                                          "ratio": ratio}))
    # P3: DICOMweb (STOW-RS) against C-STORE into the same Orthanc, MB/s
    if "P3" in selected and not any(k.startswith("P3/") and not k.endswith("-in")
                                    for r in runs for k in r):
        why = P3_NOT_IMPLEMENTED if not dicomweb_available else \
            "n/a (needs Orthanc and its DICOMweb plugin)"
        rows.append(Row("P3", "end to end via DICOMweb (STOW-RS)", why, "-",
                        target=TARGETS["P3"][0], verdict="n/a"))
    elif "P3" in selected:
        for c in ("small", "ct"):
            stow, s_val = _throughput(runs, f"P3/{c}/stow")
            cstore, c_val = _throughput(runs, f"P3/{c}/cstore")
            ratio = median(_ratios(runs, f"P3/{c}/stow", f"P3/{c}/cstore", mbps))
            target, verdict = _verdict("P3", ratio)
            rows.append(Row("P3", f"end to end {c} → Orthanc via STOW-RS (minus stable age; "
                            f"router: {settings.stow_concurrency} request(s) in flight)",
                            stow, f"C-STORE {cstore}", _fmt_ratio(ratio), target, verdict,
                            {"stow_inst_s": s_val, "cstore_inst_s": c_val, "ratio": ratio}))
    else:
        skipped("P3", "end to end via DICOMweb (STOW-RS)")

    # P4: peak RSS with the large instance, and with the big study
    if "P4" in selected:
        for corpus, via, what in (("large", "router", "large instance"),
                                  ("study", "router", "big study"),
                                  ("study", "stow", "big study via STOW-RS"),
                                  ("study", "s3zip", "big study as an S3 zip"),
                                  ("study", "folderzip", "big study as a folder zip")):
            key = f"P4/{corpus}/{via}"
            if not any(key in r for r in runs):
                continue  # results from before the big study was measured
            peak = median(_series(runs, key, lambda m: float(m["peak_rss_mb"])))
            idle = median(_series(runs, key, lambda m: float(m["idle_rss_mb"])))
            size = median(_series(runs, key, lambda m: float(m["bytes"]) / 1e6))
            count = median(_series(runs, key, lambda m: float(m.get("instances", 1))))
            target, verdict = _verdict("P4", peak)
            text = f"{peak:.0f} MB" if peak is not None else (_failed(runs, key) or "-")
            shape = (f" ({count:.0f} × {size / count:.1f} MB)"
                     if size is not None and count and count > 1 else
                     f" ({size:.0f} MB)" if size is not None else "")
            rows.append(Row("P4", f"peak RSS, {what}{shape} in + out", text,
                            f"idle {idle:.0f} MB" if idle is not None else "-", "-", target,
                            verdict, {"peak_rss_mb": peak, "idle_rss_mb": idle,
                                      "corpus": corpus}))
    else:
        skipped("P4", "peak RSS with the large instance and the big study")

    # P5: n concurrent associations vs one
    if "P5" in selected:
        n = settings.associations
        for kind, label in (("router", "router"), ("router-2", "router"),
                            ("storescp", "storescp"), ("storescp-fork", "storescp --fork")):
            if not any(f"P5/small/{kind}" in r for r in runs):
                continue  # results from before this variant existed
            single = "router" if kind.startswith("router") else "storescp"
            many, m_val = _throughput(runs, f"P5/small/{kind}")
            one, _ = _throughput(runs, f"P1/small/{single}")
            ratio = median(_ratios(runs, f"P5/small/{kind}", f"P1/small/{single}", rate))
            per_1000 = median(_series_cpu(runs, f"P5/small/{kind}"))
            one_cpu = median(_series_cpu(runs, f"P1/small/{single}"))
            values = {"inst_s": m_val, "ratio": ratio, "cpu_s_per_1000": per_1000,
                      "cpu_s_per_1000_one": one_cpu}
            if per_1000 is not None:  # what decides the scaling on a machine with more cores
                many += f", {per_1000:.2f} CPU s/1000"
            if one_cpu is not None:
                one += f", {one_cpu:.2f} CPU s/1000"
            if kind.startswith("router"):
                target, verdict = _verdict("P5", ratio)
                what = f"receive small, {n} associations vs 1" + (
                    ", receivers: 2" if kind == "router-2" else "")
                rows.append(Row("P5", what, many, f"1 association {one}", _fmt_ratio(ratio),
                                target, verdict, values))
            else:  # how a C receiver scales here: the ratio the box allows
                rows.append(Row("P5", f"same, {label} (reference)", "-",
                                f"{n}: {many}; 1: {one}", _fmt_ratio(ratio), values=values))
    else:
        skipped("P5", "concurrent associations")

    # P7: several routers on PostgreSQL + S3 (moto)
    if "P7" in selected and any(k.startswith("P7/") for r in runs for k in r):
        embedded, _ = _throughput(runs, "P1/small/router")
        one, _ = _throughput(runs, "P7/small/nodes1-shared")
        for key, what, den, base in (
                ("nodes1-shared", "receive small, 1 node, ack_after shared vs embedded",
                 "P1/small/router", f"embedded {embedded}"),
                ("nodes1-local", "receive small, 1 node, ack_after local vs embedded",
                 "P1/small/router", f"embedded {embedded}"),
                *((f"nodes{n}-shared", f"receive small, {n} nodes vs 1 (ack_after shared)",
                   "P7/small/nodes1-shared", f"1 node {one}")
                  for n in range(2, settings.nodes + 1)),
                ("nodes2-shared-pinned", "receive small, 2 nodes each on its own CPU "
                 "(taskset) vs 1", "P7/small/nodes1-shared", f"1 node {one}")):
            name = f"P7/small/{key}"
            if not any(name in r for r in runs):
                continue
            value, v = _throughput(runs, name)
            ratio = median(_ratios(runs, name, den, rate))
            costs = {c: median(_series(runs, name, lambda m, c=c: float(m[c])))
                     for c in ("router_cpu_ms", "postgres_cpu_ms", "s3_cpu_ms",
                               "pg_transactions", "s3_objects")}
            rows.append(Row("P7", what, value, base, _fmt_ratio(ratio),
                            values={"inst_s": v, "ratio": ratio, **costs}))
    elif "P7" in selected:
        skipped("P7", "several routers on PostgreSQL + S3", "not run (PostgreSQL or moto "
                "missing)")
    else:
        skipped("P7", "several routers on PostgreSQL + S3")
    if "P8" in selected:
        rows.extend(_flat_rows(runs, settings, "P8", "SQLite"))
        if any("P8/pg/large" in r for r in runs):
            rows.extend(_flat_rows(runs, settings, "P8/pg", "PostgreSQL"))
    else:
        skipped("P8", "cost flat as the state grows")
    return rows


#: P8: (measurement key, what, unit, absolute limit for the large state or None)
P8_FIGURES = (
    ("startup_seconds", "start-up, recovery scan included", "s", 30.0),
    ("find_patient_ms", "C-FIND STUDY by PatientID", "ms", 50.0),
    ("find_dates_ms", "C-FIND STUDY by a StudyDate range of two days", "ms", 50.0),
    ("tick_ms", "one study-tracker tick", "ms", 10.0),
    ("housekeeping_ms", "one housekeeping pass", "ms", None),
    ("status_ms", "dicomrouter status (a process)", "ms", 1000.0),
    ("status_inprocess_ms", "dicomrouter status, its work alone (no interpreter start)", "ms",
     None),
    ("metrics_ms", "/metrics scrape", "ms", 100.0),
)


def _flat_rows(runs: Runs, settings: Settings, prefix: str, backend: str) -> list[Row]:
    """P8: each figure for the large state, against the empty one; receive throughput too."""
    rows: list[Row] = []
    size = f"{backend}, {settings.flat_instances:,} instances in {settings.flat_studies:,} " \
        "studies"
    for key, what, unit, limit in P8_FIGURES:
        large = median(_series(runs, f"{prefix}/large", lambda m, k=key: float(m[k])))
        empty = median(_series(runs, f"{prefix}/empty", lambda m, k=key: float(m[k])))
        if large is None:
            rows.append(Row("P8", f"{what}, {size}", _failed(runs, f"{prefix}/large") or "-",
                            "-"))
            continue
        ratio = median(_ratios(runs, f"{prefix}/large", f"{prefix}/empty",
                               lambda m, k=key: float(m[k])))
        target = f"< {limit:g} {unit}" if limit is not None else "-"
        verdict = "-" if limit is None else "met" if large < limit else "not met"
        rows.append(Row("P8", f"{what}, {size}", f"{large:.1f} {unit}",
                        "empty " + (f"{empty:.1f} {unit}" if empty is not None else "-"),
                        _fmt_ratio(ratio), target, verdict,
                        values={"large": large, "empty": empty, "ratio": ratio}))
    receive = median(_series(runs, f"{prefix}/large", lambda m: rate(m["receive"])))
    empty_rate = median(_series(runs, f"{prefix}/empty", lambda m: rate(m["receive"])))
    ratio = median(_ratios(runs, f"{prefix}/large", f"{prefix}/empty",
                           lambda m: rate(m["receive"])))
    if receive is not None:
        rows.append(Row("P8", f"receive small, 1 association, {size}", f"{receive:.0f} inst/s",
                        f"empty {empty_rate or 0:.0f} inst/s", _fmt_ratio(ratio), "≥ 0.9×",
                        "n/a" if ratio is None else "met" if ratio >= 0.9 else "not met",
                        values={"inst_s": receive, "ratio": ratio}))
    return rows


def notes(runs: Runs) -> list[str]:
    """Extra facts worth a line under the table."""
    out: list[str] = []
    for corpus, what in (("large", "the large instance"), ("study", "the big study")):
        key = f"P4/{corpus}/router"
        rec = median(_series(runs, key,
                             lambda m: float(m["bytes"]) / 1e6 / float(m["receive_seconds"])))
        dlv = median(_series(runs, key, lambda m: float(m["deliver_seconds"])))
        rx_max = median(_series(runs, key, lambda m: float(m["receive_rss_max_mb"])))
        fw_max = median(_series(runs, key, lambda m: float(m["forward_rss_max_mb"])))
        if rec is not None and dlv is not None:
            out.append(f"P4: the router received {what} at {rec:.1f} MB/s and forwarded it to "
                       f"storescp in {dlv:.1f} s after its stable age; VmRSS sampled every "
                       f"50 ms peaked at {rx_max:.0f} MB while receiving and {fw_max:.0f} MB "
                       "while forwarding.")
    for key in sorted({k for r in runs for k in r if k.startswith("P7/")}):
        costs = {c: median(_series(runs, key, lambda m, c=c: float(m[c])))
                 for c in ("router_cpu_ms", "postgres_cpu_ms", "s3_cpu_ms",
                           "pg_transactions", "s3_objects")}
        wall = median(_series(runs, key, lambda m: 1000 * float(m["seconds"]) /
                              float(m["instances"])))
        if all(v is not None for v in costs.values()) and wall is not None:
            out.append(f"{key}: per instance {wall:.2f} ms wall, "
                       f"{costs['router_cpu_ms']:.2f} ms router CPU, "
                       f"{costs['postgres_cpu_ms']:.2f} ms PostgreSQL CPU, "
                       f"{costs['s3_cpu_ms']:.2f} ms S3 server CPU; "
                       f"{costs['pg_transactions']:.1f} PostgreSQL transactions and "
                       f"{costs['s3_objects']:.1f} S3 objects.")
    for size in ("empty", "large"):
        key = f"P8/pg/{size}"
        got = [m["receive"] for m in (r.get(key) for r in runs)
               if _ok(m) and "wal_bytes_per_instance" in m.get("receive", {})]
        wal = median([float(x["wal_bytes_per_instance"]) for x in got])
        if wal is not None:
            out.append(f"{key}: receiving wrote {wal / 1000:.1f} kB of PostgreSQL WAL per "
                       "instance.")
    for c in ("small", "ct"):
        r = median(_series(runs, f"P2/{c}/router", lambda m: float(m["receive_seconds"])))
        g = median(_series(runs, f"P2/{c}/gateway", lambda m: float(m["receive_seconds"])))
        if r is not None and g is not None:
            out.append(f"P2 {c}: of which receiving took {r:.2f} s (router) and {g:.2f} s "
                       "(Orthanc gateway).")
    return out


COLUMNS = ("", "measurement", "dicomrouter", "baseline", "ratio", "target", "verdict")


def _cells(row: Row) -> list[str]:
    return [row.id, row.measurement, row.router, row.baseline, row.ratio, row.target,
            row.verdict]


def render_text(rows: Sequence[Row]) -> str:
    """A fixed-width table."""
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row]) -> str:
    """A GitHub Markdown table."""
    head = ["id", *COLUMNS[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def as_json(settings: Settings, corpora: dict[str, Corpus], runs: Runs, rows: Sequence[Row],
            machine: dict[str, Any], extra_notes: Sequence[str]) -> dict[str, Any]:
    """Everything, machine-readable."""
    return {
        "machine": machine,
        "settings": settings.as_dict(),
        "corpora": {name: c.as_dict() for name, c in corpora.items()},
        "rows": [asdict(r) for r in rows],
        "notes": list(extra_notes),
        "runs": list(runs),
    }
