"""Results as JSON, a Markdown table with the targets (met / not met), and PNG plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .common import verdict

log = logging.getLogger(__name__)

TARGETS = {
    "latency": "event p50 <= 1 ms and p99 <= 10 ms",
    "throughput": ">= 20,000 events/s with 0 lost",
    "scale": "100,000 watched directories with server RSS <= 200 MB",
    "datapath": "at least as fast as sshfs on every line",
}
KINDS = ("create", "modify", "rename", "delete")
METHODS = (("local", "local inotify (host)"), ("notifyfs", "notifyfs remote events"),
           ("poll", "100 ms polling over the mount"), ("touch", "touch forwarding (--no-events)"))


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _mb(v: Any) -> str:
    return "—" if v is None else f"{v / 1e6:,.0f} MB"


def latency_md(r: dict[str, Any]) -> list[str]:
    lines = ["## Event latency (host change → guest watcher)", "",
             f"Target: {TARGETS['latency']}. {r.get('events_per_kind')} changes per kind "
             f"({r.get('poll_events_per_kind')} for polling and touch forwarding), one at a time.", "",
             "| method | change | n | p50 ms | p95 ms | p99 ms | lost | p50 vs local | target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, label in METHODS:
        if key not in r:
            continue
        for kind in KINDS:
            x = r[key][kind]
            met = None
            if key == "notifyfs":
                met = (x["p50"] is not None and x["p50"] <= 1 and x["p99"] <= 10 and x["lost"] == 0)
            ratio = x.get("ratio_p50")
            lines.append(f"| {label} | {kind} | {x['n']} | {_f(x['p50'])} | {_f(x['p95'])} | "
                         f"{_f(x['p99'])} | {x['lost']} | {_f(ratio, 1) + '×' if ratio else '—'} | "
                         f"{verdict(met) if key == 'notifyfs' else ''} |")
    return lines


def throughput_md(r: dict[str, Any]) -> list[str]:
    lines = ["## Throughput and loss", "",
             f"Target: {TARGETS['throughput']}. The host changes {r['files']:,} files per phase as "
             "fast as it can; an inotify watcher on the mount counts every event.", "",
             "| phase | host changes/s | events delivered/s | changes delivered/s | lost | overflows "
             "(server/watcher) | drain s | server CPU s / 1k events | agent CPU s / 1k events |",
             "|---|---|---|---|---|---|---|---|---|"]
    for phase in ("create", "modify", "delete"):
        x = r[phase]
        lines.append(f"| {phase} | {_f(x['host_changes_per_s'], 0)} | {_f(x['events_per_s'], 0)} | "
                     f"{_f(x['changes_per_s'], 0)} | {x['lost']} | {x['server_overflows']}/"
                     f"{x['watcher_overflows']} | {_f(x['drain_seconds'])} | "
                     f"{_f(x['server_cpu_per_1k_events'], 3)} | {_f(x['agent_cpu_per_1k_events'], 3)} |")
    met = r["events_per_s"] >= 20_000 and r["lost"] == 0
    lines += ["", f"All phases: {_f(r['events_per_s'], 0)} events/s, {r['lost']} lost — "
              f"**{verdict(met)}**"]
    return lines


def scale_md(r: dict[str, Any]) -> list[str]:
    lines = ["## Watch scale", "", f"Target: {TARGETS['scale']}.", "",
             "| directories | setup s | guest watches | host watches | server RSS | agent RSS | "
             "first event ms | create p50 ms | p99 ms | lost | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        if "error" in p:
            lines.append(f"| {p['dirs']:,} | error: {p['error']} |" + " |" * 9)
            continue
        lat = p["latency"]
        met = None
        if p["dirs"] >= 100_000:
            met = p["server_rss"] <= 200e6 and p["host_watches"] >= p["dirs"]
        lines.append(f"| {p['dirs']:,} | {_f(p['setup_seconds'])} | {p['guest_watches']:,} | "
                     f"{p['host_watches']:,} | {_mb(p['server_rss'])} | {_mb(p['agent_rss'])} | "
                     f"{_f(p['latency_first_ms'])} | {_f(lat['p50'])} | {_f(lat['p99'])} | "
                     f"{lat['lost']} | {verdict(met)} |")
    return lines


def datapath_md(r: dict[str, Any]) -> list[str]:
    from .datapath import LINES
    t = r["targets"]
    lines = ["## Data path", "",
             f"Target: {TARGETS['datapath']}. {r['meta_files']:,} files for the metadata lines, "
             f"{r['seq_bytes'] / 2**20:,.0f} MiB sequential, a tarball of {r['tar_files']:,} "
             "Python standard library files, `git status` on a repository of the same files.", ""]
    if "sshfs_skipped" in r:
        lines += [f"sshfs column skipped: {r['sshfs_skipped']}", ""]
    lines += ["| line | unit | local | notifyfs | sshfs | notifyfs vs local | notifyfs vs sshfs | target |",
              "|---|---|---|---|---|---|---|---|"]
    for line, unit, _higher in LINES:
        ratio = r["ratios"][line]
        vs_s = ratio.get("vs_sshfs")
        d = 3 if unit == "s" else 0
        lines.append(f"| {line} | {unit} | {_f(t['local'][line], d)} | {_f(t['notifyfs'][line], d)} | "
                     f"{_f(t['sshfs'][line], d) if 'sshfs' in t else '—'} | "
                     f"{_f(ratio.get('vs_local'))}× | {_f(vs_s) + '×' if vs_s else '—'} | "
                     f"{verdict(None if vs_s is None else vs_s >= 1)} |")
    lines += ["", "Ratios above 1 mean notifyfs is faster (times are inverted for the s lines)."]
    return lines


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# notifyfs benchmark ({res['mode']} mode)", "",
             f"{m['date']}; {m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python "
             f"{m['python']}; load average {m['loadavg_start']:.1f} at the start, "
             f"{m.get('loadavg_end', 0):.1f} at the end; {res.get('seconds', 0):.0f} s in all.", ""]
    for note in res.get("notes", []):
        lines.append(f"* {note}")
    for name, fn in (("latency", latency_md), ("throughput", throughput_md), ("scale", scale_md),
                     ("datapath", datapath_md)):
        if name not in res:
            continue
        lines.append("")
        if "error" in res[name]:
            lines += [f"## {name}", "", f"failed: {res[name]['error']}"]
            continue
        lines += fn(res[name])
    return "\n".join(lines) + "\n"


def plots(res: dict[str, Any], out: Path) -> list[str]:
    """PNG plots; needs matplotlib (the ``bench`` extra): without it, none and a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed (pip install 'notifyfs[bench]')"]
    made = []
    lat = res.get("latency", {})
    if "local" in lat:
        fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
        for ax, kind in zip(axes, KINDS, strict=True):
            for key, label in METHODS:
                s = sorted(lat.get(key, {}).get(kind, {}).get("samples_ms", []))
                if s:
                    ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
            ax.set_xscale("log")
            ax.set_title(kind)
            ax.set_xlabel("latency (ms, log)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel("fraction of events")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "latency-cdf.png", dpi=90)
        plt.close(fig)
        made.append("latency-cdf.png")
    pts = [p for p in res.get("scale", {}).get("points", []) if "error" not in p]
    if pts:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        xs = [p["dirs"] for p in pts]
        a1.plot(xs, [p["server_rss"] / 1e6 for p in pts], "o-", label="server RSS")
        a1.plot(xs, [p["agent_rss"] / 1e6 for p in pts], "o-", label="agent RSS")
        a1.axhline(200, ls="--", c="grey", label="target (server)")
        a1.set_xscale("log")
        a1.set_xlabel("watched directories")
        a1.set_ylabel("MB")
        a1.legend()
        a2.plot(xs, [p["setup_seconds"] for p in pts], "o-", label="watch setup (s)")
        a2.plot(xs, [p["latency"]["p50"] or 0 for p in pts], "o-", label="create p50 (ms)")
        a2.plot(xs, [p["latency"]["p99"] or 0 for p in pts], "o-", label="create p99 (ms)")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.set_xlabel("watched directories")
        a2.legend()
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=90)
        plt.close(fig)
        made.append("scale.png")
    tp = res.get("throughput", {})
    if "create" in tp:
        fig, ax = plt.subplots(figsize=(6, 4))
        phases = ["create", "modify", "delete"]
        ax.bar([p + " host" for p in phases], [tp[p]["host_changes_per_s"] for p in phases],
               color="grey", label="host changes/s")
        ax.bar([p + " guest" for p in phases], [tp[p]["events_per_s"] for p in phases],
               label="events delivered/s")
        ax.axhline(20_000, ls="--", c="red", label="target 20,000/s")
        ax.tick_params(axis="x", rotation=45)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=90)
        plt.close(fig)
        made.append("throughput.png")
    return made


def write(res: dict[str, Any], out: Path) -> None:
    made = plots(res, out)
    res["plots"] = made
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    md = markdown(res)
    md += "".join(f"\n![{p}]({p})\n" for p in made if p.endswith(".png"))
    (out / "results.md").write_text(md)
