"""The machine description, the Markdown table of ratios, and the requests/s plot."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

from redis import Redis

from benchmarks.worker_bench import PLAIN_ARQ

PACKAGES = (
    "asgi-worker",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
    "msgpack",
    "arq",
    "fastapi",
    "fastapi-cache2",
    "cashews",
)
PEERS = ("fastapi-cache2", "cashews", "cashews (protected=False)")
TARGET_PEERS = ("fastapi-cache2", "cashews")  # with their defaults
HIT_TARGET = 0.9
WORKER_TARGET = 0.7
TTR_TARGET_MS = 3.0
STORAGE_TARGET = 256
# The reference ratios (wrk -c32), for comparison only.
REFERENCE = {
    "redis-floor/bare": 0.23,
    "fastapi-cache2/redis-floor": 0.31,
    "cashews/redis-floor": 0.33,
}


def _first_line(path: str, key: str) -> str:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip() if ":" in line else line.split("=", 1)[1]
    except OSError:
        pass
    return "unknown"


def revision(root: Path) -> str:
    """The commit of the library being measured, `+dirty` if asgi_worker/ has changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "asgi_worker"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine(redis: Redis, root: Path) -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
        wrk_version = (wrk.stdout or wrk.stderr).splitlines()[0].strip()
    except (OSError, IndexError):
        wrk_version = "not installed"
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    from redis.utils import HIREDIS_AVAILABLE

    return {
        "nproc": os.cpu_count(),
        "cpu": _first_line("/proc/cpuinfo", "model name"),
        "memory": _first_line("/proc/meminfo", "MemTotal"),
        "os": _first_line("/etc/os-release", "PRETTY_NAME").strip('"'),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis.info("server")["redis_version"],
        "hiredis_in_use": HIREDIS_AVAILABLE,
        "wrk": wrk_version,
        "packages": versions,
        "asgi_worker_revision": revision(root),
    }


# ------------------------------------------------------------------ numbers


def _rps(results: dict[str, Any], name: str) -> list[float]:
    return [r["requests_per_second"] for r in results["throughput"]["rounds"][name]]


def _ratios(results: dict[str, Any], a: str, b: str) -> list[float]:
    """Per-round ratios a/b: the two ran back to back in the same round."""
    return [x / y for x, y in zip(_rps(results, a), _rps(results, b), strict=True)]


def _cpu_ratios(results: dict[str, Any], a: str, b: str) -> list[float]:
    """Per-round (CPU/request of b) / (CPU/request of a): how many a's per b's CPU."""
    rounds = results["throughput"]["rounds"]
    out = []
    for x, y in zip(rounds[a], rounds[b], strict=True):
        if x.get("web_cpu_seconds") and y.get("web_cpu_seconds"):
            out.append(
                (y["web_cpu_seconds"] / y["requests"]) / (x["web_cpu_seconds"] / x["requests"])
            )
    return out


def worker_ratio(results: dict[str, Any]) -> float:
    """Median per-round asgi-worker replays/s over raw arq no-op jobs/s."""
    if "worker" not in results:
        return float("nan")
    return median(_worker_ratios(results["worker"]))


def _worker_ratios(worker: dict[str, Any], name: str = "asgi-worker") -> list[float]:
    """Per round: `name`'s jobs/s over raw arq no-op jobs/s."""
    return [
        a["per_second"] / b["per_second"] for a, b in zip(worker[name], worker["arq"], strict=True)
    ]


# The reference runs of worker_bench (older results have none).
_WORKER_REFERENCES = ("arq + SET", "arq + replay")
# The other rows of worker_bench: each is shown where the results have it.
_WORKER_ROWS = (PLAIN_ARQ, *_WORKER_REFERENCES)


def _cpu_per_request(runs: list[dict[str, Any]], field: str) -> list[float]:
    return [r[field] / r["requests"] * 1e6 for r in runs if r.get(field) is not None]


def _other_cpu(rounds: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Cores used by everything else on the machine, per load run."""
    fields = ("web_cpu_seconds", "redis_cpu_seconds", "load_generator_cpu_seconds")
    out = []
    for runs in rounds.values():
        for r in runs:
            if r.get("machine_cpu_seconds") is None or any(r.get(f) is None for f in fields):
                continue
            mine = sum(r[f] for f in fields)
            out.append(max(0.0, r["machine_cpu_seconds"] - mine) / r["seconds"])
    return out


def _maybe(values: list[float], fmt: str) -> str:
    return fmt.format(median(values)) if values else "n/a"


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


# ------------------------------------------------------------------ markdown


def markdown(results: dict[str, Any]) -> str:
    """The whole report: targets first, then each section's details."""
    lines: list[str] = []
    m = results["machine"]
    lines += [
        f"Command: `{results['command']}` ({results['seconds']:.0f} s)",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, {m['os']}, "
        f"Linux {m['kernel']}, Python {m['python']}, Redis {m['redis_server']} on loopback, "
        f"{m['wrk']}.",
        "",
        f"asgi-worker at commit {m['asgi_worker_revision']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items())
        + ".",
        "",
    ]
    lines += _targets(results)
    if "throughput" in results:
        lines += _throughput(results)
    if "ttr" in results:
        lines += _ttr(results["ttr"])
    if "worker" in results:
        lines += _worker(results["worker"])
    if "storage" in results:
        lines += _storage(results)
    for section, title in (("throughput", "Hit path"), ("worker", "Worker")):
        profiles = results.get(section, {}).get("profiles")
        if profiles:
            lines += _profiles(title, profiles)
    return "\n".join(lines) + "\n"


def _targets(results: dict[str, Any]) -> list[str]:
    rows = ["## Targets", "", "| measure | measured | target | |", "| --- | --- | --- | --- |"]
    if "throughput" in results:
        n = len(_rps(results, "bare"))
        rows.append(
            f"| redis-floor / bare (req/s) | {_spread(_ratios(results, 'redis-floor', 'bare'))}"
            f" | reference ~{REFERENCE['redis-floor/bare']} | |"
        )
        hit = _ratios(results, "asgi-worker hit", "redis-floor")
        rows.append(
            f"| **asgi-worker hit / redis-floor** | {_spread(hit)} | >= {HIT_TARGET} "
            f"| {_verdict(median(hit) >= HIT_TARGET)} |"
        )
        cpu = _cpu_ratios(results, "asgi-worker hit", "redis-floor")
        if cpu:
            rows.append(
                "| asgi-worker hit / redis-floor, by web-process CPU per request "
                f"(floor us/req / asgi-worker us/req) | {_spread(cpu)} | (explains the above) | |"
            )
        near = [n for n in results["throughput"]["rounds"] if n.startswith("asgi-worker hit (")]
        for name in near:
            note = (
                "(every request its own Redis lookup, for information)"
                if "coalesce" in name
                else "(optional feature, for information)"
            )
            rows.append(
                f"| {name} / redis-floor | {_spread(_ratios(results, name, 'redis-floor'))} "
                f"| {note} | |"
            )
        for peer in PEERS:
            reference = REFERENCE.get(f"{peer}/redis-floor")
            rows.append(
                f"| {peer} / redis-floor | {_spread(_ratios(results, peer, 'redis-floor'))} "
                f"| {f'reference ~{reference}' if reference else ''} | |"
            )
        for peer in PEERS:
            ahead = _ratios(results, "asgi-worker hit", peer)
            if peer in TARGET_PEERS:
                rows.append(
                    f"| **asgi-worker hit / {peer}** | {_spread(ahead)} | > 1 "
                    f"| {_verdict(median(ahead) > 1)} |"
                )
            else:
                rows.append(
                    f"| asgi-worker hit / {peer} | {_spread(ahead)} | (same work per request) | |"
                )
        rows.append(f"| (ratios: median of {n} rounds, min-max in brackets) | | | |")
    if "ttr" in results:
        t = results["ttr"]
        rows.append(
            f"| **time-to-ready p50** (p95, p99), {t['urls']} URLs | {t['p50_ms']:.1f} ms "
            f"({t['p95_ms']:.1f}, {t['p99_ms']:.1f}) | < {TTR_TARGET_MS:.0f} ms "
            f"| {_verdict(t['p50_ms'] < TTR_TARGET_MS)} |"
        )
    if "worker" in results:
        w = results["worker"]
        ratios = _worker_ratios(w)
        rows.append(
            f"| **worker replays/s / arq no-op jobs/s** (N={w['jobs']}) | {_spread(ratios)} "
            f"| >= {WORKER_TARGET} | {_verdict(median(ratios) >= WORKER_TARGET)} |"
        )
        if PLAIN_ARQ in w:
            rows.append(
                f"| worker under arq's own `Worker` (`arq module.WorkerSettings`) "
                f"| {_spread(_worker_ratios(w, PLAIN_ARQ))} | (the other way to run it) | |"
            )
        for name in _WORKER_REFERENCES:
            if name in w:
                rows.append(
                    f"| reference: {name} jobs/s / arq no-op jobs/s "
                    f"| {_spread(_worker_ratios(w, name))} | (where the cost goes) | |"
                )
        counted = w.get("instructions", {}).get("ratio_to_arq")
        if counted:
            rows.append(
                "| worker, by instructions per job (callgrind: arq no-op / asgi-worker) "
                f"| {counted['asgi-worker']:.3f} | (noise-free guide, see below) | |"
            )
    if "storage" in results:
        for label, e in results["storage"]["entries"].items():
            rows.append(
                f"| **storage overhead, {label} body** (STRLEN - body - headers) "
                f"| {e['overhead_strlen']} B (+ {e['header_bytes']} B of headers) "
                f"| < {STORAGE_TARGET} B + headers "
                f"| {_verdict(e['overhead_strlen'] < STORAGE_TARGET)} |"
            )
        mem = results["storage"]["memory"]
        growth = mem["rss_after_hits_kib"] - mem["rss_start_kib"]
        rows.append(
            f"| web RSS after {mem['keys']:,} distinct keys (misses, then hits) "
            f"| {mem['rss_after_hits_kib'] / 1024:.1f} MiB ({growth:+,} KiB) | (no target) | |"
        )
    return [*rows, ""]


def _throughput(results: dict[str, Any]) -> list[str]:
    t = results["throughput"]
    s = results["settings"]
    names = list(t["rounds"])
    rows = [
        "## Requests/s: `GET /item`, 1 KiB JSON body, every request a hit",
        "",
        f"uvicorn (one process, uvloop, httptools) per app; load: `{t['tool']}`, "
        f"{s['duration']:g} s per run, {s['rounds']} rounds, apps interleaved (the order "
        f"rotates each round) after {s['warmup']:g} s of warm-up each.",
        "",
        "| app | req/s median (min-max) | latency p50 / p99 (ms) | x bare | x redis-floor "
        "| web CPU us/req | web CPU busy | Redis CPU us/req | RSS after (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        runs = t["rounds"][name]
        p50 = median(r["latency_p50_ms"] for r in runs)
        p99 = median(r["latency_p99_ms"] for r in runs)
        web = _cpu_per_request(runs, "web_cpu_seconds")
        redis = _cpu_per_request(runs, "redis_cpu_seconds")
        busy = [r["web_cpu_seconds"] / r["seconds"] for r in runs if r.get("web_cpu_seconds")]
        rows.append(
            f"| {name} | {_spread(_rps(results, name), '{:.0f}')} | {p50:.2f} / {p99:.2f} "
            f"| {median(_ratios(results, name, 'bare')):.2f} "
            f"| {median(_ratios(results, name, 'redis-floor')):.2f} "
            f"| {_maybe(web, '{:.0f}')} | {_maybe(busy, '{:.0%}')} | {_maybe(redis, '{:.0f}')} "
            f"| {t['rss_kib'][name] / 1024:.1f} |"
        )
    rows += [
        "",
        "CPU from /proc/<pid>/stat (user + system) over each run, divided by its requests "
        "(medians): unlike req/s it does not depend on how the two cores were shared with "
        "wrk, Redis and whatever else ran on the machine.",
    ]
    other = _other_cpu(t["rounds"])
    if other:
        rows += [
            "",
            f"Other processes on the machine (not the app, Redis or wrk) used a median of "
            f"{median(other):.2f} CPU cores during the load runs (max {max(other):.2f}): "
            "the noise the interleaved rounds are there to show.",
        ]
    rows += [
        "",
        "Per round (req/s):",
        "",
        "| app | " + " | ".join(f"round {i + 1}" for i in range(s["rounds"])) + " |",
        "| --- |" + " --- |" * s["rounds"],
    ]
    for name in names:
        rows.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in _rps(results, name)) + " |")
    rows += ["", "Stored entry of `/item` (1 KiB body) per app:", ""]
    rows += ["| app | key name (B) | STRLEN (B) | MEMORY USAGE (B) |", "| --- | --- | --- | --- |"]
    for name, e in t["entries_1kib"].items():
        rows.append(f"| {name} | {e['key_bytes']} | {e['strlen']} | {e['memory_usage']} |")
    return [*rows, ""]


def _ttr(t: dict[str, Any]) -> list[str]:
    rows = [
        "## Time-to-ready",
        "",
        f"A real `asgi-worker worker` with the default `Config` (only `prefix` set), a "
        f"trivial endpoint, {t['urls']} cold URLs one after the other (a random 0-20 ms "
        f"pause between them). Clock: from sending the first GET (202) to receiving the "
        f"first 200; the client polls every {t['poll_interval_ms']:g} ms.",
        "",
        "| p50 | p95 | p99 | min | max |",
        "| --- | --- | --- | --- | --- |",
        f"| {t['p50_ms']:.1f} ms | {t['p95_ms']:.1f} ms | {t['p99_ms']:.1f} ms "
        f"| {t['min_ms']:.1f} ms | {t['max_ms']:.1f} ms |",
        "",
    ]
    if "floor_p50_ms" in t:
        rows += [
            f"Ready by the client's first poll: {t['first_poll_share']:.0%} of the URLs. "
            f"What this client could not beat had the response been there at once (the "
            f"202's round trip, one pause, the 200's round trip), p50: "
            f"{t['floor_p50_ms']:.1f} ms.",
            "",
        ]
    return rows


def _worker(w: dict[str, Any]) -> list[str]:
    rows = [
        "## Worker throughput",
        "",
        f"Backlog of N={w['jobs']} jobs, drained by one worker in burst mode "
        f"(`max_jobs` {w['max_jobs']}, `poll_delay` {w['poll_delay']} s, `keep_result` 0, "
        "all), clock from the end of worker startup to the last job done. asgi-worker: N "
        "distinct cold URLs of a trivial endpoint, enqueued by the middleware, replayed "
        "and stored by a `ReplayWorker` (as `asgi-worker worker` runs), which commits each "
        f"job in arq's end-of-job transaction; {PLAIN_ARQ}: the same under arq's plain "
        "`Worker` (as `arq module.WorkerSettings` runs), one round trip more per job. "
        "arq: N no-op jobs. References, raw arq jobs that each do one part of "
        "a replay job: `arq + SET` stores an entry-sized value in one Redis round trip (the "
        "least any job that keeps its result in Redis does); `arq + replay` replays the "
        "trivial endpoint and encodes its entry, storing nothing.",
        "",
    ]
    names = ["asgi-worker", "arq", *(name for name in _WORKER_ROWS if name in w)]
    rows += [
        "| round | " + " | ".join(f"{name} jobs/s" for name in names) + " | asgi-worker / arq "
        "| worker CPU us/job (" + " / ".join(names) + ") | Redis CPU us/job (asgi-worker / arq) |",
        "| --- " * (len(names) + 4) + "|",
    ]
    for i in range(len(w["arq"])):
        runs = [w[name][i] for name in names]
        a, b = runs[0], runs[1]
        rows.append(
            f"| {i + 1} | "
            + " | ".join(f"{run['per_second']:.0f}" for run in runs)
            + f" | {a['per_second'] / b['per_second']:.2f} | "
            + " / ".join(f"{run['worker_cpu_us_per_job']:.0f}" for run in runs)
            + f" | {a['redis_cpu_us_per_job']:.0f} / {b['redis_cpu_us_per_job']:.0f} |"
        )
    cpu = [
        b["worker_cpu_us_per_job"] / a["worker_cpu_us_per_job"]
        for a, b in zip(w["asgi-worker"], w["arq"], strict=True)
    ]
    rows += [
        "",
        f"By worker CPU per job (arq us/job / asgi-worker us/job), the ratio is "
        f"{_spread(cpu)}: the worker process is CPU-bound, so this is the ratio a quiet "
        "machine would show.",
    ]
    return [*rows, "", *_instructions(w.get("instructions", {}))]


def _instructions(counted: dict[str, Any]) -> list[str]:
    if "skipped" in counted:
        return [f"Instructions per job: not measured ({counted['skipped']}).", ""]
    if not counted:
        return []
    rows = [
        f"Instructions per job (`python -m benchmarks.instructions`, {counted['jobs']} jobs "
        "per drain under valgrind's callgrind, minus an empty drain): exact and repeatable "
        "whatever the machine is doing, unlike jobs/s. Time in the kernel (socket calls) "
        "and memory stalls are not counted, so a job with one more round trip fares worse "
        "in jobs/s than here.",
        "",
        "| job | instructions per job | arq no-op / this job |",
        "| --- | --- | --- |",
    ]
    for name, value in counted["instructions_per_job"].items():
        rows.append(f"| {name} | {value:,.0f} | {counted['ratio_to_arq'][name]:.3f} |")
    return [*rows, ""]


def _storage(results: dict[str, Any]) -> list[str]:
    st = results["storage"]
    rows = [
        "## Storage",
        "",
        "One stored response per body size, written by the real worker. Overhead = STRLEN "
        "(or MEMORY USAGE) minus the body and the stored headers' names and values. "
        "Reference: the same status, headers and body as a bare msgpack `{status, headers, "
        "body}` blob (what redis-floor reads).",
        "",
        "| body | stored headers (count, B) | key name (B) | STRLEN | STRLEN overhead "
        "| MEMORY USAGE | MEMORY USAGE overhead | bare blob STRLEN / MEMORY USAGE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, e in st["entries"].items():
        ref = e["reference_blob"]
        rows.append(
            f"| {label} | {e['headers']}, {e['header_bytes']} | {e['key_bytes']} "
            f"| {e['strlen']} | {e['overhead_strlen']} | {e['memory_usage']} "
            f"| {e['overhead_memory_usage']} | {ref['strlen']} / {ref['memory_usage']} |"
        )
    mem = st["memory"]
    growth = mem["rss_after_hits_kib"] - mem["rss_start_kib"]
    rows += [
        "",
        f"Web process (uvicorn, default `Config`) VmRSS: {mem['rss_start_kib']:,} KiB at start; "
        f"{mem['rss_after_misses_kib']:,} KiB after {mem['keys']:,} distinct cold URLs (202, "
        f"one job each); {mem['rss_after_hits_kib']:,} KiB after the same {mem['keys']:,} "
        f"as hits ({growth:+,} KiB, {growth * 1024 / mem['keys']:.0f} B per key). Misses "
        f"served at {mem['misses_per_second']:.0f}/s, hits at {mem['hits_per_second']:.0f}/s "
        "(Python client, 32 connections); the CLI burst worker took "
        f"{mem['cli_burst_worker_seconds']:.1f} s for them, startup included.",
        "",
    ]
    return rows


def _short(frame: str) -> str:
    name, _, location = frame.partition(" (")
    return f"`{name}` ({location}"


def _profiles(title: str, profiles: dict[str, Any]) -> list[str]:
    rows = [
        f"## Profile: {title.lower()} (py-spy, non-idle samples)",
        "",
        "A Python frame's self time includes the C code and system calls it makes: uvloop's "
        "socket write shows as `RequestResponseCycle.send` (uvicorn), redis-py's as "
        "`StreamWriter.writelines` (asyncio); uvloop's own loop as `Runner.run`.",
        "",
    ]
    for name, p in profiles.items():
        extra = ""
        if "requests_per_second_while_sampled" in p:
            extra = f", {p['requests_per_second_while_sampled']:.0f} req/s while sampled"
        rows += [
            f"**{name}** ({p['samples']} samples{extra}). Self time by package: "
            + ", ".join(f"{pkg} {share:.0%}" for pkg, share in p["by_package"] if share >= 0.01)
            + ".",
            "",
            "| self | function (file:line) |",
            "| --- | --- |",
        ]
        rows += [f"| {share:.1%} | {_short(frame)} |" for frame, share in p["self_time"][:12]]
        inclusive = p.get("asgi_worker_inclusive")
        if inclusive:
            rows += ["", "| inclusive | asgi_worker function (file:line) |", "| --- | --- |"]
            rows += [f"| {share:.1%} | {_short(frame)} |" for frame, share in inclusive[:15]]
        rows.append("")
    return rows


README_START = "<!-- results: start (written by `python -m benchmarks.run --update-readme`) -->"
README_END = "<!-- results: end -->"


def update_readme(path: Path, table: str) -> None:
    """Replace what is between the README's result markers with this run's report."""
    text = path.read_text()
    head, found, rest = text.partition(README_START)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise RuntimeError(f"{path} has no result markers")
    body = table.replace("## ", "### ")  # one level below the README's own sections
    path.write_text(f"{head}{README_START}\n\n{body}\n{README_END}{tail}")


# ------------------------------------------------------------------ plot


def plot(results: dict[str, Any], path: Path) -> None:
    """Bar chart of requests/s per app: median, min-max whiskers, one dot per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["throughput"]
    s = results["settings"]
    names = list(t["rounds"])
    medians = [median(_rps(results, n)) for n in names]
    lows = [m - min(_rps(results, n)) for m, n in zip(medians, names, strict=True)]
    highs = [max(_rps(results, n)) - m for m, n in zip(medians, names, strict=True)]
    palette = {
        "bare": "#9e9e9e",
        "redis-floor": "#607d8b",
        "asgi-worker hit": "#1f77b4",
        "fastapi-cache2": "#d98c3a",
        "cashews": "#b5651d",
        "cashews (protected=False)": "#e3b47c",
    }
    colors = [palette.get(name, "#8fbbe0") for name in names]
    fig, ax = plt.subplots(figsize=(10, 5.4), dpi=120)
    x = range(len(names))
    ax.bar(x, medians, yerr=[lows, highs], capsize=5, color=colors, zorder=2)
    for i, name in enumerate(names):
        values = _rps(results, name)
        ax.scatter([i] * len(values), values, color="black", s=10, zorder=3)
        ratio = median(_ratios(results, name, "redis-floor"))
        ax.annotate(
            f"{medians[i]:,.0f}\n{ratio:.2f}x floor",
            (i, medians[i] + highs[i]),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=9,
        )
    floor = medians[names.index("redis-floor")]
    ax.axhline(
        HIT_TARGET * floor,
        color="#1f77b4",
        linestyle="--",
        linewidth=1,
        zorder=1,
        label=f"target for asgi-worker hit: {HIT_TARGET}x redis-floor",
    )
    ax.legend(loc="upper right", fontsize=9, frameon=False)
    ax.set_xticks(list(x), [n.replace(" (", "\n(") for n in names], fontsize=9)
    ax.set_ylabel("requests/s (median; whiskers min-max; dots: rounds)")
    ax.set_ylim(0, max(m + h for m, h in zip(medians, highs, strict=True)) * 1.18)
    ax.grid(axis="y", alpha=0.3, zorder=0)
    m = results["machine"]
    ax.set_title(
        f"GET /item, 1 KiB body, all hits - uvicorn (uvloop, httptools), {t['tool']}, "
        f"{s['rounds']} x {s['duration']:g} s\n{m['nproc']} CPUs ({m['cpu']}), "
        f"Python {m['python']}, Redis {m['redis_server']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
