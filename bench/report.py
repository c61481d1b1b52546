"""Output of a run: the terminal table, the JSON document (and its schema check), the PNG.

The JSON keeps every raw sample, so any figure in the table can be recomputed from it;
``validate`` is the schema, checked before a document is written and by the tests.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

__all__ = ["validate", "write_json", "render_table", "print_table", "plot"]


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))

_TOP = {"schema": str, "created_unix": _NUM, "machine": dict, "config": dict, "shapes": list,
        "providers": dict, "results": list, "cases": list, "probe": (dict, type(None)),
        "baseline": str, "reference": str, "wall_s": _NUM}
_MACHINE = {"device": str, "python": str, "cpu": dict, "versions": dict, "commit": dict}
_VERSIONS = {"torch": str, "cuda": _OPT_STR, "triton": _OPT_STR}
_RESULT = {"optim": str, "dtype": str, "shape": str, "provider": str, "family": str,
           "status": str, "reason": _OPT_STR, "mode": str, "samples_ms": list,
           "stats_ms": (dict, type(None)), "steps": int, "bytes_per_element": (dict, type(None)),
           "bytes_per_step": _OPT_NUM, "gbps": _OPT_NUM, "pct_limit": _OPT_NUM,
           "ratio_vs_baseline": _OPT_NUM, "peak_mem_bytes": _OPT_NUM, "max_rel_err": _OPT_NUM,
           "numel": int, "n_tensors": int}
_STATS = {"n": int, "median": _NUM, "mean": _NUM, "stdev": _NUM, "min": _NUM, "max": _NUM,
          "q25": _NUM, "q75": _NUM, "iqr": _NUM, "spread_pct": _NUM}
# Added after the first committed results: checked when present (older documents load).
_RESULT_OPTIONAL = {"ratio_vs_fastest_torch": _OPT_NUM, "wrong": bool}
_PROBE = {"limit_gbps": _NUM, "limit_stream": str, "runs": list}
# Added with the sparse-grad cases: the (optimizer, shape) pairs not run.
_TOP_OPTIONAL = {"skipped_cases": list}
_SKIPPED_CASE = {"optim": str, "dtype": str, "shape": str, "reason": str}
_STATUSES = ("ok", "skipped", "failed")


def _check(obj: Any, spec: dict, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for key, typ in spec.items():
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(obj[key], typ) or (isinstance(obj[key], bool) and bool not in
                                             (typ if isinstance(typ, tuple) else (typ,))):
            raise ValueError(f"{where}.{key}: {type(obj[key]).__name__} is not {typ}")


def validate(doc: dict) -> None:
    """Raises ValueError naming the first place where ``doc`` breaks the schema."""
    from .runner import SCHEMA

    _check(doc, _TOP, "doc")
    _check(doc, {k: t for k, t in _TOP_OPTIONAL.items() if k in doc}, "doc")
    for i, c in enumerate(doc.get("skipped_cases", [])):
        _check(c, _SKIPPED_CASE, f"doc.skipped_cases[{i}]")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"doc.schema: {doc['schema']!r} is not {SCHEMA!r}")
    _check(doc["machine"], _MACHINE, "doc.machine")
    _check(doc["machine"]["versions"], _VERSIONS, "doc.machine.versions")
    if doc["probe"] is not None:
        _check(doc["probe"], _PROBE, "doc.probe")
    for i, r in enumerate(doc["results"]):
        where = f"doc.results[{i}]"
        _check(r, _RESULT, where)
        _check(r, {k: t for k, t in _RESULT_OPTIONAL.items() if k in r}, where)
        if r["status"] not in _STATUSES:
            raise ValueError(f"{where}.status: {r['status']!r} not in {_STATUSES}")
        if r["status"] == "ok":
            if not r["samples_ms"] or r["stats_ms"] is None:
                raise ValueError(f"{where}: status ok without samples")
            _check(r["stats_ms"], _STATS, where + ".stats_ms")
            if r["stats_ms"]["n"] != len(r["samples_ms"]):
                raise ValueError(f"{where}: stats n != number of samples")
            if not all(isinstance(x, _NUM) and x > 0 for x in r["samples_ms"]):
                raise ValueError(f"{where}.samples_ms: non-positive or non-numeric sample")
        elif r["reason"] is None:
            raise ValueError(f"{where}: status {r['status']} without a reason")


def _clean(x):
    # JSON has no NaN/Infinity: write them as null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_json(doc: dict, path: str) -> None:
    validate(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(doc), f, indent=1, default=str)
        f.write("\n")


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------

COLUMNS = ["provider", "ms/step", "±", "GB/s", "% limit", "vs torch-fused", "vs fastest",
           "B/elem", "peak mem", "max err", "note"]
NOTE = len(COLUMNS) - 1


def _columns(doc: dict, key) -> list[str]:
    """The column headers of one case: "vs fastest" names the torch implementation it
    is measured against, e.g. "vs fastest (torch-foreach)"."""
    fastest = (_case_info(doc, key).get("fastest_torch") or {}).get("provider")
    cols = list(COLUMNS)
    if fastest:
        cols[6] = f"vs fastest ({fastest})"
    return cols


def _case_info(doc: dict, key) -> dict:
    return next((c for c in doc["cases"] if (c["optim"], c["dtype"], c["shape"]) == key), {})


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _note(r: dict) -> str:
    text = r["reason"] or ""
    return text if len(text) <= 90 else text[:87] + "..."


def _row(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["provider"], r["status"], "", "", "", "", "", "", "", "", _note(r)]
    st = r["stats_ms"]
    bpe = r["bytes_per_element"]["total"] if r["bytes_per_element"] else None
    return [
        r["provider"] + (" (graph)" if r["mode"] == "cuda-graph" else ""),
        f"{st['median']:.3f}" if st["median"] < 10 else f"{st['median']:.1f}",
        f"{st['spread_pct']:.0f}%",
        _fmt(r["gbps"], ".1f"),
        _fmt(r["pct_limit"], ".0f", "%"),
        _fmt(r["ratio_vs_baseline"], ".2f", "x"),
        _fmt(r.get("ratio_vs_fastest_torch"), ".2f", "x"),
        _fmt(bpe, ".4g"),
        _fmt_bytes(r["peak_mem_bytes"]),
        _fmt(r["max_rel_err"], ".1e"),
        _note(r),
    ]


def _cases(doc: dict):
    order: list[tuple] = []
    groups: dict[tuple, list[dict]] = {}
    for r in doc["results"]:
        key = (r["optim"], r["dtype"], r["shape"])
        if key not in groups:
            order.append(key)
            groups[key] = []
        groups[key].append(r)
    return [(k, groups[k]) for k in order]


def _case_title(doc: dict, key, rows) -> str:
    optim, dtype, shape = key
    r0 = rows[0]
    info = _case_info(doc, key)
    extra = ""
    if info.get("limit"):
        extra += (f"; limit {info['limit']['gbps']:.1f} GB/s (AdamW-shaped stream over the "
                  "same tensor sizes, same rounds)")
    if info.get("noop_err") is not None:
        extra += f"; a no-op step would show max err {info['noop_err']:.1e}"
    if info.get("reference_error"):
        extra += f"; no max err: the torch.optim reference failed ({info['reference_error']})"
    sp = info.get("sparse")
    if sp:
        emb = next((s.get("embedding") for s in doc.get("shapes", []) if s["name"] == shape),
                   None) or {}
        hot = f" from {emb['hot_rows']:,} hot rows" if emb.get("hot_rows") else ""
        table = (f"Embedding({emb['num_embeddings']:,}, {emb['embedding_dim']})"
                 if emb else f"{r0['numel'] / 1e6:.1f}M elements")
        return (f"{optim} {dtype} {shape}: {table}, sparse grads of {sp['lookups']:,} "
                f"lookups{hot}, {sp['mean_unique_rows']:,.0f} distinct rows a step "
                f"(B/elem per touched row element; torch.optim has one implementation "
                f"for sparse grads: torch-forloop){extra}")
    return (f"{optim} {dtype} {shape}: {r0['n_tensors']} tensors, "
            f"{r0['numel'] / 1e6:.1f}M elements{extra}")


def _header_lines(doc: dict) -> list[str]:
    m = doc["machine"]
    v = m["versions"]
    if m.get("gpu"):
        hw = f"{m['gpu']['name']} (sm {m['gpu']['capability']})"
    else:
        hw = (f"{m['cpu']['model']}, {m['cpu']['logical_cpus']} CPUs, "
              f"{m['cpu']['torch_threads']} torch threads, flags {' '.join(m['cpu']['flags'])}")
    lines = [f"device {m['device']}: {hw}",
             f"torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
             f"commit {(m['commit'].get('sha') or 'none')[:12]}"
             f"{' (dirty)' if m['commit'].get('dirty') else ''}"]
    p = doc.get("probe")
    if p:
        streams = {}
        for run in p["runs"]:
            for name, s in run["streams"].items():
                streams[name] = max(streams.get(name, 0.0), s["gbps"])
        detail = ", ".join(f"{k} {v:.1f}" for k, v in streams.items())
        lines.append(f"bandwidth probes at start/end: {detail} GB/s (best of each); "
                     "% limit is per case, against the stream run in the same rounds")
    busy = m.get("others_busy")
    if busy:
        lines.append(f"other processes used {100 * busy['others_cpu_fraction']:.0f}% of the "
                     f"CPUs during the run (steal {100 * busy['steal_cpu_fraction']:.0f}%)"
                     + ("  <- the machine was busy: numbers are noisy" if noisy(doc) else ""))
    return lines


def noisy(doc: dict) -> bool:
    """Other processes took more than 10% of the CPUs during the run."""
    busy = doc["machine"].get("others_busy")
    return bool(busy) and busy["others_cpu_fraction"] + busy["steal_cpu_fraction"] > 0.10


def _in_case(r: dict) -> bool:
    """Rows shown in a case's table: every provider that ran, or was stopped within the
    case; providers unavailable for the whole run are listed once under "skipped"."""
    return r["status"] != "skipped" or (r["reason"] or "").startswith(("needs ~", "too slow"))


def _skip_lines(doc: dict) -> list[str]:
    """Providers unavailable for a whole (optim, dtype), once each; then the (optimizer,
    shape) pairs not run (an optimizer on grads it does not take), once per reason."""
    out, seen = [], set()
    for r in doc["results"]:
        if (r["status"] == "skipped" and not _in_case(r) and r["reason"]
                and (r["provider"], r["reason"]) not in seen):
            seen.add((r["provider"], r["reason"]))
            combos = sorted({f"{x['optim']}/{x['dtype']}" for x in doc["results"]
                             if x["provider"] == r["provider"] and x["reason"] == r["reason"]})
            out.append(f"{r['provider']} ({', '.join(combos)}): {r['reason']}")
    cases: dict[tuple[str, str], list[str]] = {}
    for c in doc.get("skipped_cases", []):
        shapes = cases.setdefault((c["optim"], c["reason"]), [])
        if c["shape"] not in shapes:
            shapes.append(c["shape"])
    for (optim, reason), shapes in cases.items():
        out.append(f"{optim} on {', '.join(shapes)}: {reason}")
    return out


def render_table(doc: dict) -> str:
    """The table as plain text (what print_table shows without rich)."""
    lines = _header_lines(doc)
    for key, rows in _cases(doc):
        shown = [r for r in rows if _in_case(r)]
        if not shown:
            continue
        cells = [_columns(doc, key)] + [_row(r) for r in shown]
        if not any(c[-1] for c in cells[1:]):
            cells = [c[:-1] for c in cells]
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        lines.append("")
        lines.append(_case_title(doc, key, rows))
        for j, c in enumerate(cells):
            lines.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w)
                                   for i, (x, w) in enumerate(zip(c, widths))).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
    skips = _skip_lines(doc)
    if skips:
        lines.append("")
        lines.append("skipped:")
        lines += [f"  {s}" for s in skips]
    summary = summary_lines(doc)
    if summary:
        lines.append("")
        lines += summary
    lines.append("")
    lines.append(_legend(doc))
    return "\n".join(lines)


def summary_lines(doc: dict) -> list[str]:
    """Per case, the best fused_optim provider against torch's fastest implementation
    and against torch-fused: the figures issue targets are stated in."""
    rows = []
    for c in doc["cases"]:
        best, fastest = c.get("best_fused_optim"), c.get("fastest_torch")
        if not best or not fastest:
            continue
        vs_base = best.get("ratio_vs_baseline")
        rows.append((f"{c['optim']} {c['dtype']} {c['shape']}",
                     f"{best['ratio_vs_fastest_torch']:.2f}x",
                     f"{best['provider']}{' (graph)' if best.get('mode') == 'cuda-graph' else ''}",
                     f"vs {fastest['provider']} ({fastest['median_ms']:.3g} ms)",
                     "" if vs_base is None else f"{vs_base:.2f}x vs torch-fused"))
    if not rows:
        return []
    device = doc["machine"].get("device", "")
    out = [f"summary: best fused_optim vs torch's fastest {device.upper()} implementation "
           "(per case, median of per-round speedups)"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.append("  " + "  ".join(x.rjust(w) if i == 1 else x.ljust(w)
                                    for i, (x, w) in enumerate(zip(r, widths))).rstrip())
    return out


def _legend(doc: dict) -> str:
    return ("ms/step: median of the timed steps, ± the interquartile range; GB/s: bytes of "
            "the provider's storage (B/elem) over the median; vs torch-fused: median of "
            "per-round speedups (>1 faster); vs fastest: the same against the fastest torch "
            "implementation in the case (lowest median of torch-forloop/foreach/fused, named "
            "in the header); sparse grads (embedding shapes): bytes of the touched rows "
            "(param and states read and written once per distinct row, each grad value and "
            "its 8 B index read once), B/elem per touched row element; "
            "peak mem: optimizer state + step transients; "
            "max err: max |p - p_torch_forloop| / max |p_torch_forloop| over all params, "
            f"after the same steps. Wall time {doc.get('wall_s', 0):.0f} s.")


def print_table(doc: dict, console=None) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(render_table(doc))
        return
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or redirected (make bench | tee): rich would assume 80 columns.
            console = Console(width=160)
    for line in _header_lines(doc):
        console.print(line, highlight=False, markup=False)
    for key, rows in _cases(doc):
        shown = [r for r in rows if _in_case(r)]
        if not shown:
            continue
        table = Table(title=Text(_case_title(doc, key, rows)), title_justify="left",
                      show_edge=False, pad_edge=False)
        rows_cells = [_row(r) for r in shown]
        header = _columns(doc, key)
        columns = header if any(c[-1] for c in rows_cells) else header[:-1]
        for i, c in enumerate(columns):
            if i == NOTE:   # the note wraps; the numbers never shrink
                table.add_column(c, justify="left", no_wrap=False, overflow="fold")
            else:
                width = max([len(c)] + [len(cells[i]) for cells in rows_cells])
                table.add_column(c, justify="left" if i == 0 else "right", no_wrap=True,
                                 min_width=width)
        for r, cells in zip(shown, rows_cells):
            style = None
            if r["status"] != "ok":
                style = "dim"
            elif r["provider"] == doc.get("baseline"):
                style = "bold"
            table.add_row(*(Text(c) for c in cells[:len(columns)]), style=style)
        console.print()
        console.print(table)
    skips = _skip_lines(doc)
    if skips:
        console.print()
        console.print("skipped:", style="dim")
        for s in skips:
            console.print(f"  {s}", style="dim", highlight=False, markup=False)
    summary = summary_lines(doc)
    if summary:
        console.print()
        for i, s in enumerate(summary):
            console.print(s, style="bold" if i == 0 else None, highlight=False, markup=False)
    console.print()
    console.print(_legend(doc), style="dim", highlight=False, markup=False)


# --------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------

def plot(doc: dict, path: str) -> None:
    """GB/s per provider per shape, one panel per (optimizer, dtype), with the measured
    bandwidth limit drawn as a line, and over the best fused_optim bar of each shape its
    speedup against the fastest torch implementation of the case ("2.6x vs foreach")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in doc["results"] if r["status"] == "ok" and r["gbps"] is not None]
    panels = []
    for r in ok:
        if (r["optim"], r["dtype"]) not in panels:
            panels.append((r["optim"], r["dtype"]))
    providers = []
    for r in ok:
        if r["provider"] not in providers:
            providers.append(r["provider"])
    limit = doc["probe"]["limit_gbps"] if doc.get("probe") else None
    colors = plt.get_cmap("tab10" if len(providers) <= 10 else "tab20")
    n = max(1, len(panels))
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 1.6 * _max_shapes(ok, panels) + 3), 3.6 * n),
                             squeeze=False)
    for ax, panel in zip(axes[:, 0], panels or [("", "")]):
        rows = [r for r in ok if (r["optim"], r["dtype"]) == panel]
        shapes = []
        for r in rows:
            if r["shape"] not in shapes:
                shapes.append(r["shape"])
        width = 0.8 / max(1, len(providers))
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, s in enumerate(shapes):
                hit = next((r for r in rows if r["shape"] == s and r["provider"] == prov), None)
                if hit:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(hit["gbps"])
            if xs:
                ax.bar(xs, ys, width, label=prov, color=colors(j))
        label_top = 0.0
        for i, s in enumerate(shapes):
            info = _case_info(doc, (panel[0], panel[1], s))
            best, fastest = info.get("best_fused_optim"), info.get("fastest_torch")
            hit = best and next((r for r in rows if r["shape"] == s
                                 and r["provider"] == best["provider"]), None)
            if hit and fastest:
                j = providers.index(best["provider"])
                ax.annotate(f"{best['ratio_vs_fastest_torch']:.2f}x vs\n"
                            f"{fastest['provider'].removeprefix('torch-')}",
                            (i - 0.4 + width * (j + 0.5), hit["gbps"]), ha="center",
                            va="bottom", fontsize=6, xytext=(0, 2), textcoords="offset points")
                label_top = max(label_top, hit["gbps"] * 1.18)   # room for the label
        case_limits = {c["shape"]: c["limit"]["gbps"] for c in doc["cases"]
                       if (c["optim"], c["dtype"]) == panel and c.get("limit")}
        labelled = False
        for i, s in enumerate(shapes):
            # Each case's limit: the AdamW-shaped stream measured in the same rounds.
            lim = case_limits.get(s, limit)
            if lim:
                ax.hlines(lim, i - 0.45, i + 0.45, colors="black", linestyles="--",
                          linewidth=1.2, label=None if labelled else "limit (measured)")
                ax.text(i + 0.45, lim, f"{lim:.0f}", va="bottom", ha="right", fontsize=7)
                labelled = True
        if label_top > ax.get_ylim()[1]:
            ax.set_ylim(top=label_top)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{panel[0]} {panel[1]}  (label: best fused_optim vs fastest torch)",
                     fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    m = doc["machine"]
    hw = m["gpu"]["name"] if m.get("gpu") else m["cpu"]["model"]
    fig.suptitle(f"fused_optim.bench on {hw} (torch {m['versions']['torch']})"
                 + ("  [busy machine: noisy]" if noisy(doc) else ""), fontsize=10)
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=1,
                   bbox_to_anchor=(1.0, 1.0 - 0.02))
    fig.tight_layout(rect=(0, 0, 0.82, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _max_shapes(ok, panels) -> int:
    return max([len({r["shape"] for r in ok if (r["optim"], r["dtype"]) == p}) for p in panels]
               or [1])
