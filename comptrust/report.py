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


def markdown(report: dict) -> str:
    rows = report["configs"]
    dimensions = [r["dimension"] for r in rows[0]["results"] if r["dimension"] != "perplexity"]
    header = ["config", "perplexity ↓"]
    for dim in dimensions:
        header += [f"{dim} (95% CI)", f"{dim} flips vs dense"]
    header += ["weights MiB", "peak RSS MiB", f"prefill ms ({rows[0]['efficiency']['prompt_tokens']} tok)",
               "decode tok/s"]
    lines = [f"# comptrust report — {report['model']['name']}", "",
             f"Created {report['created']}; torch {report['environment']['torch']}, "
             f"{report['environment']['threads']} threads; CPU backend: {report['environment']['cpu_backend']}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        eff = row["efficiency"]
        cells = [row["name"], f"{_metric(row, 'perplexity')['score']:.2f}"]
        for dim in dimensions:
            m = _metric(row, dim)
            flag = "" if m["above_chance"] else " (chance-level)"
            cells.append(f"{m['score']:.1f} [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}]{flag}")
            cells.append("—" if m["flip_rate"] is None else f"{100 * m['flip_rate']:.1f}% (KL {m['mean_kl']:.4f})")
        cells += [f"{eff['weight_bytes'] / MIB:.1f}", f"{eff['peak_rss_bytes'] / MIB:.0f}",
                  f"{eff['prefill_ms']:.1f}", f"{eff['decode_tokens_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Peak RSS: the process's high-water mark during that configuration's evaluation and speed runs "
              "(reset after loading and compressing). Scores with a 95% interval that includes chance are "
              "marked chance-level; flips count items whose answer differs from the dense model's.", ""]
    for row in rows:
        lines += [f"**{row['name']}** sample — {row['sample']['prompt']!r} → {row['sample']['output']!r}", ""]
        if row.get("compression"):
            kept = row["compression"]["kept_dense"]
            lines += [f"{row['name']}: {len(row['compression']['replaced'])} linear layers compressed; "
                      f"kept dense: {', '.join(f'{k} ({v})' for k, v in kept.items()) or 'none'}.", ""]
    return "\n".join(lines)
