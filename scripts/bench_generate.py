"""Generation throughput from batching: LanguageModel.generate on the same prompts, batched and one at a time.

Both runs use the embedded model, greedy decoding and the same max_new_tokens, in this process, timed in
alternation (batched, unbatched, batched, ...) so machine noise hits both; the ratio of the medians is
the figure. Prompts are one dimension's built-in probes, as that dimension builds them: machine ethics
(zero-shot), toxicity (benign template) or privacy (all three scenarios).

    .venv/bin/python scripts/bench_generate.py --workload toxicity --prompts 32 --batch-size 16 --max-new-tokens 32
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from comptrust.evals import LanguageModel, machine_ethics, privacy, toxicity
from comptrust.models import load_model


def workload_prompts(lm: LanguageModel, workload: str) -> list[str]:
    if workload == "ethics":
        return [lm.prompt_messages(machine_ethics.zero_shot_messages(item.scenario))
                for item in machine_ethics.load_builtin_probes()]
    if workload == "toxicity":
        system = toxicity.TEMPLATES["benign"][0]
        return [lm.prompt(toxicity.user_message("benign", prompt.text), system)
                for prompts in toxicity.load_builtin_probes().values() for prompt in prompts]
    by_scenario: dict[str, list] = {}
    for item in privacy.builtin_items():
        by_scenario.setdefault(item.scenario, []).append(item)
    # round-robin over the scenarios, so that a prefix of the list holds all three
    items = [item for group in zip(*by_scenario.values()) for item in group]
    return [privacy.render(lm, item.messages) for item in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["ethics", "toxicity", "privacy"], default="toxicity")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    loaded = load_model("default")
    lm = LanguageModel(loaded.model, loaded.tokenizer, loaded.chat)
    prompts = workload_prompts(lm, args.workload)[:args.prompts]
    times = {1: [], args.batch_size: []}
    answers = {}
    for _ in range(args.repeats):
        for size in (args.batch_size, 1):
            start = time.perf_counter()
            answers[size] = lm.generate(prompts, args.max_new_tokens, batch_size=size, progress=False)
            times[size].append(time.perf_counter() - start)
    tokens = sum(len(loaded.tokenizer(a[0], add_special_tokens=False)["input_ids"]) for a in answers[1])
    same = sum(a == b for a, b in zip(answers[1], answers[args.batch_size]))
    one, batched = statistics.median(times[1]), statistics.median(times[args.batch_size])
    print(f"{args.workload}: {len(prompts)} prompts, up to {args.max_new_tokens} new tokens each ({tokens} generated), "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"one at a time: {one:.2f} s ({tokens / one:.1f} tok/s); batch {args.batch_size}: {batched:.2f} s "
          f"({tokens / batched:.1f} tok/s); speedup {one / batched:.2f}x")
    print(f"identical greedy answers batched and unbatched: {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
