"""Perplexity of the embedded model dense and compressed, for the quality sanity check of the methods.

Calibration windows come from the first half of a text file and perplexity is measured on the second
half, so no method sees its evaluation text (default: ../shared/data/wikitext-2/test.txt, which is only
read here, never shipped). Compressed models run on the packed / sparse kernels.

    .venv/bin/python scripts/compression_quality.py --tags dense rtn-w4g128 gptq-w4g128 mag-24 sparsegpt-24
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from comptrust.compress import calibration_tokens, compress_, config_from_tag, is_calibrated
from comptrust.evals import perplexity
from comptrust.models import load_model

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", nargs="+", default=["dense", "rtn-w4g128", "gptq-w4g128"])
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    text = Path(args.text).read_text(encoding="utf-8")
    half = len(text) // 2
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as calib_file:
        calib_file.write(text[:half])
    print(f"calibration: {args.calib_samples} x {args.calib_seqlen} tokens from the first half of {args.text}; "
          f"perplexity: {args.eval_tokens} tokens of the second half, windows of 512")
    dense_ppl = None
    for tag in args.tags:
        loaded = load_model("default")
        start = time.perf_counter()
        if tag != "dense":
            config = config_from_tag(tag)
            calib = None
            if is_calibrated(config):
                calib = calibration_tokens(loaded.tokenizer, calib_file.name, args.calib_samples, args.calib_seqlen)
            compress_(loaded.model, config, calib, progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(loaded.model, loaded.tokenizer, text[half:], "wikitext-2 test, second half", seq_len=512,
                         max_tokens=args.eval_tokens, progress=False).score
        dense_ppl = dense_ppl or ppl
        print(f"{tag:<22} perplexity {ppl:8.3f}  ({ppl / dense_ppl - 1:+.1%} vs dense)  compress {seconds:6.1f} s",
              flush=True)


if __name__ == "__main__":
    main()
