"""Writes a run's results: report.json (one schema for every dimension), samples.jsonl (per item), report.md."""
from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from comptrust.evals.schema import SCHEMA_VERSION

MIB = 1024 * 1024


def environment() -> dict:
    import transformers

    import comptrust
    from comptrust import ops

    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    return {
        "comptrust": comptrust.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
        "threads": torch.get_num_threads(), "git": git,
        "backends": {name: info["available"] for name, info in ops.backends().items()},
        "cpu_backend": ops.backends()["cpu"]["detail"],
    }


def write_report(out_dir: Path, model: dict, rows: list[dict], samples: list[dict], settings: dict) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"schema": SCHEMA_VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "environment": environment(), "settings": settings, "model": model, "configs": rows}
    paths = {"json": out_dir / "report.json", "samples": out_dir / "samples.jsonl", "markdown": out_dir / "report.md"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    with paths["samples"].open("w") as handle:
        for sample in samples:
            handle.write(json.dumps(sample) + "\n")
    paths["markdown"].write_text(markdown(report))
    return {key: str(path) for key, path in paths.items()}


def _metric(row: dict, dimension: str) -> dict | None:
    return next((r for r in row["results"] if r["dimension"] == dimension), None)


def trust_average(row: dict) -> float | None:
    """The mean of the row's trust-dimension scores (DecodingTrust's trust average when all 8 ran)."""
    scores = [r["score"] for r in row["results"] if r["dimension"] != "perplexity"]
    return sum(scores) / len(scores) if scores else None


def markdown(report: dict) -> str:
    rows = report["configs"]
    lines = [f"# comptrust report — {report['model']['name']}", "",
             f"Created {report['created']}; torch {report['environment']['torch']}, "
             f"{report['environment']['threads']} threads; CPU backend: {report['environment']['cpu_backend']}.", ""]
    lines += _efficiency_table(rows) + _side_by_side_table(rows) + _serving_table(rows)
    dimensions = [r["dimension"] for r in rows[0]["results"] if r["dimension"] != "perplexity"]
    if dimensions:
        lines += _trust_table(rows, dimensions) + _sub_scores(rows, dimensions)
    for row in rows:
        lines += [f"**{row['name']}** sample — {row['sample']['prompt']!r} → {row['sample']['output']!r}", ""]
        if row.get("compression"):
            kept = row["compression"]["kept_dense"]
            lines += [f"{row['name']}: {len(row['compression']['replaced'])} linear layers compressed; "
                      f"kept dense: {', '.join(f'{k} ({v})' for k, v in kept.items()) or 'none'}.", ""]
    return "\n".join(lines)


def _efficiency_table(rows: list[dict]) -> list[str]:
    header = ["config", "perplexity ↓", "weights MiB", "peak RSS MiB", "decode RSS MiB",
              f"prefill ms ({rows[0]['efficiency']['prompt_tokens']} tok)", "decode tok/s", "HF decode tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        eff = row["efficiency"]
        cells = [row["name"], f"{_metric(row, 'perplexity')['score']:.2f}", f"{eff['weight_bytes'] / MIB:.1f}",
                 _mib(eff["peak_rss_bytes"]), _decode_rss(eff), f"{eff['prefill_ms']:.1f}",
                 f"{eff['decode_tokens_per_s']:.1f}" + ("" if eff.get("runtime") == "lean" else " (HF)"),
                 _rate(eff.get("hf_decode_tokens_per_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["Peak RSS: the process's high-water mark during that configuration's evaluation and speed runs (reset "
             "after loading and compressing). Decode RSS: its high-water mark during the batch-1 speed run alone, "
             "the memory serving the model takes"]
    baseline = rows[0]["efficiency"].get("process_baseline_rss_bytes")
    if baseline:
        notes.append(f"; in brackets, the part above the {baseline / MIB:.0f} MiB the process held once its last "
                     "model was freed (interpreter, torch, transformers)")
    return lines + ["", _speed_note(rows) + "".join(notes) + ".", ""]


def _side_by_side_table(rows: list[dict]) -> list[str]:
    """The decode speeds measured again with every model in memory and their runs interleaved (run.py), as
    ratios to the first such row (dense where it is there): the ratios to compare."""
    measured = [row for row in rows if row["efficiency"].get("side_by_side_decode_tokens_per_s")]
    if not measured:
        notes = sorted({row["efficiency"]["side_by_side_note"] for row in rows
                        if row["efficiency"].get("side_by_side_note")})
        return [f"Side-by-side decode speeds {notes[0]}.", ""] if notes else []
    first = measured[0]
    base = first["efficiency"]["side_by_side_decode_tokens_per_s"]
    lines = [f"| config | decode tok/s side by side | × {first['name']} |", "|---|---|---|"]
    for row in measured:
        rate = row["efficiency"]["side_by_side_decode_tokens_per_s"]
        lines.append(f"| {row['name']} | {rate:.1f} | {rate / base:.2f} |")
    rounds = first["efficiency"].get("side_by_side_rounds")
    note = ("Side by side: once every configuration was evaluated, their models were loaded again all at once "
            "(compressed ones from checkpoints written for this) and their greedy batch-1 decode runs interleaved, "
            f"one run of each per round{f' ({rounds} rounds after a warm-up one; medians)' if rounds else ''}, so a "
            "drift in the machine's memory bandwidth falls on all of them alike: compare these ratios (decode tok/s "
            "above times each configuration alone, in turn)")
    missing = [row["name"] for row in rows if row not in measured]
    if missing:
        note += f"; not in it (no checkpoint form to load again): {', '.join(missing)}"
    return lines + ["", note + ".", ""]


def _serving_table(rows: list[dict]) -> list[str]:
    """Each configuration served alone in a process without transformers (comptrust.serving_process): its decode
    RSS and the process's whole peak (loading or decoding), as ratios to the first such row (dense where it is
    there), and its decode speed there."""
    measured = [row for row in rows if row["efficiency"].get("serving")]
    if not measured:
        notes = sorted({row["efficiency"]["serving_note"] for row in rows if row["efficiency"].get("serving_note")})
        return [f"Serving process: {notes[0]}.", ""] if notes else []

    def process_peak(serving: dict) -> int | None:
        decode, load = serving["decode_peak_rss_bytes"], serving["load_peak_rss_bytes"]
        return None if decode is None or load is None else max(decode, load)

    def ratio(value: int | None, reference: int | None) -> str:
        return "—" if value is None or not reference else f"{value / reference:.2f}"

    first = measured[0]["efficiency"]["serving"]
    name = measured[0]["name"]
    lines = [f"| config | serving decode RSS MiB | × {name} | above torch MiB | load peak MiB | process peak MiB | "
             f"× {name} | decode tok/s there |", "|---|---|---|---|---|---|---|---|"]
    for row in measured:
        serving = row["efficiency"]["serving"]
        peak, baseline = serving["decode_peak_rss_bytes"], serving["baseline_rss_bytes"]
        above = "—" if peak is None or baseline is None else f"{(peak - baseline) / MIB:.0f}"
        lines.append(f"| {row['name']} | {_mib(peak)} | {ratio(peak, first['decode_peak_rss_bytes'])} | {above} | "
                     f"{_mib(serving['load_peak_rss_bytes'])} | {_mib(process_peak(serving))} | "
                     f"{ratio(process_peak(serving), process_peak(first))} | {serving['decode_tokens_per_s']:.1f} |")
    note = ("Serving process: each configuration's checkpoint loaded alone in a fresh Python process that imports "
            "torch and comptrust's kernels but not transformers (comptrust.serving_process), then decoded greedily "
            "at batch 1 as above. Serving decode RSS: that process's high-water mark over its decode runs (prompt "
            "included, reset after loading), the whole process; above torch: the part above the "
            f"{first['baseline_rss_bytes'] / MIB:.0f} MiB it held after its imports, before reading the checkpoint. "
            "After loading, the checkpoint file's pages are handed back (unmapped, and dropped from the page cache so "
            "that a read maps only the page it needs): the packed tensors the layers were built from are not read "
            "again, and the embedding only a row per token plus the few rows the output projection's int8 screen "
            "leaves; dense layers read theirs again at every token and count in full. "
            "Load peak: the high-water mark while loading and building the decoder, which reads the whole "
            "embedding once for the screen, handing its pages back piece by piece; process peak: the larger of "
            "the two, the most the process ever held")
    missing = [f"{row['name']} ({row['efficiency'].get('serving_note', 'not measured')})"
               for row in rows if row not in measured]
    if missing:
        note += f"; not in it: {', '.join(missing)}"
    return lines + ["", note + ".", ""]


def _speed_note(rows: list[dict]) -> str:
    note = ("Decode tok/s: greedy batch-1 decoding on comptrust's lean runtime (the model's own layers and kernels, "
            "a preallocated KV cache, none of transformers' per-layer bookkeeping; plain fp32/bf16 linears, the "
            "output projection of every configuration among them, on comptrust's row-parallel dense_gemv, where "
            "torch's MKL sgemv ran them on one thread)")
    screened = [row["name"] for row in rows if row["efficiency"].get("greedy_head") == "screened"]
    if screened:
        which = "every configuration" if len(screened) == len(rows) else ", ".join(screened)
        note += (f"; for {which}, each greedy token came from an int8 copy of the fp32 output projection with a "
                 "proven error bound and the few rows it left computed again in fp32: the full projection's "
                 "argmax exactly, for about a quarter of its bytes (the copy counts in the decode RSS)")
    note += "; HF decode tok/s: the same through the model's transformers forward, the speed generate() gives. "
    reasons = sorted({row["efficiency"].get("runtime_note") or "not recorded" for row in rows
                      if row["efficiency"].get("runtime") != "lean"})
    if reasons:
        note += f"(HF): the lean runtime cannot run this model ({'; '.join(reasons)}), so both are transformers'. "
    return note


def _rate(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _mib(nbytes: int | None) -> str:
    return "—" if nbytes is None else f"{nbytes / MIB:.0f}"


def _decode_rss(eff: dict) -> str:
    """Decode-run peak RSS, with the part above the no-model process in brackets where both are known."""
    peak, baseline = eff.get("decode_peak_rss_bytes"), eff.get("process_baseline_rss_bytes")
    if peak is None:
        return "—"
    return _mib(peak) + ("" if baseline is None else f" ({(peak - baseline) / MIB:.0f})")


def _trust_table(rows: list[dict], dimensions: list[str]) -> list[str]:
    """One row per dimension, one column per config: score [95% CI] and, after the first (dense) column, the
    share of items whose answer flipped and the KL of the choice distributions against it."""
    header = ["dimension (0-100, higher is better)", "chance"] + [row["name"] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for dim in dimensions:
        first = _metric(rows[0], dim)
        label = dim
        if first["informative"] is False:
            label += " †"
            reason = first["uninformative_reason"] or "its 95% interval contains the chance level"
            notes.append(f"† {dim}: uninformative for {rows[0]['name']}: {reason}. Read the flip rate instead.")
        cells = [label, "—" if first["chance"] is None else f"{first['chance']:.1f}"]
        for row in rows:
            m = _metric(row, dim)
            cell = f"{m['score']:.1f}" + ("" if m["ci95"] is None else f" [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}]")
            if m["flip_rate"] is not None:
                kl = "" if m["mean_kl"] is None else f", KL {m['mean_kl']:.3f}"
                cell += f" (flips {100 * m['flip_rate']:.1f}%{kl})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    averages = [trust_average(row) for row in rows]
    name = "trust average" if len(dimensions) == 8 else f"average of {len(dimensions)}"
    lines.append("| " + " | ".join([f"**{name}**", ""] + [f"**{a:.1f}**" for a in averages]) + " |")
    return lines + [""] + notes + ([""] if notes else []) + [
        "Flips: share of items whose answer differs from the first column's model; KL: mean KL divergence of "
        "the answer distributions (items read by log-likelihood).", ""]


def _sub_scores(rows: list[dict], dimensions: list[str]) -> list[str]:
    """Each dimension's scenario-level numbers (its details), one line per config."""
    lines = ["## Sub-scores", ""]
    for dim in dimensions:
        lines.append(f"**{dim}** ({_metric(rows[0], dim)['task']}; {_metric(rows[0], dim)['scorer']})")
        for row in rows:
            numbers = _numbers(_metric(row, dim)["details"])
            lines.append(f"- {row['name']}: " + ("; ".join(f"{k} {v}" for k, v in numbers) or "—"))
        lines.append("")
    return lines


def _numbers(details: dict, prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """The numeric leaves of a details dict (two levels deep), as (dotted key, formatted value)."""
    found = []
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            found.append((name, f"{value:.3g}" if isinstance(value, float) else str(value)))
        elif isinstance(value, dict) and depth < 2:
            found += _numbers(value, name + ".", depth + 1)
    return found
