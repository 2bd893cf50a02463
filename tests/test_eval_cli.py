"""`comptrust eval`: the registry listing, the evaluation settings' checks, a dense model against its compressed
checkpoint (flip rates), and the report's trust table."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comptrust.cli import main as cli_main
from comptrust.evals import DIMENSIONS, EvalContext
from comptrust.evals.schema import MetricResult
from comptrust.report import markdown
from comptrust.models import ModelLoadError
from comptrust.run import RunConfig

DECODINGTRUST_ORDER = ["toxicity", "stereotype", "adversarial_robustness", "ood_robustness", "adv_demonstration",
                       "privacy", "machine_ethics", "fairness"]


def test_list_prints_the_eight_dimensions_with_tasks_and_data(capsys):
    assert list(DIMENSIONS) == DECODINGTRUST_ORDER
    assert cli_main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    for dimension in DIMENSIONS.values():
        assert f"{dimension.name}\n  tasks: {', '.join(dimension.tasks)}" in out
        assert dimension.tasks and dimension.official_files


def test_evaluation_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'medium'"):
        EvalContext(suite="medium")
    with pytest.raises(ValueError, match="full suite .* give --data-dir"):
        EvalContext(suite="full")
    with pytest.raises(ValueError, match="no such folder"):
        EvalContext(data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="missing.*DecodingTrust data layout"):
        EvalContext(data_dir=tmp_path).official("fairness/fairness_data/adult.jsonl")
    with pytest.raises(ValueError, match="side_by_side_rounds must be 0"):
        RunConfig(side_by_side_rounds=-1)


def save_tiny(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dense_and_int4(tiny_llama, smollm2_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense = save_tiny(tiny_llama, smollm2_tokenizer, root / "dense")
    assert cli_main(["compress", "--model", dense, "--method", "rtn", "--group-size", "32", "--out",
                     str(root / "int4"), "--no-progress"]) == 0
    return dense, str(root / "int4")


def test_eval_compares_a_compressed_checkpoint_with_its_dense_model(dense_and_int4, tmp_path, capsys):
    dense, int4 = dense_and_int4
    out = tmp_path / "report"
    assert cli_main(["eval", "--model", dense, "--compressed", int4, "--dimensions", "adversarial_robustness",
                     "--ppl-max-tokens", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [row["name"] for row in report["configs"]] == ["dense", "rtn-w4g32 (int4)"]
    dense_result, int4_result = (row["results"][1] for row in report["configs"])
    assert dense_result["dimension"] == int4_result["dimension"] == "adversarial_robustness"
    assert dense_result["flip_rate"] is None and 0 <= int4_result["flip_rate"] <= 1
    assert int4_result["mean_kl"] >= 0 and dense_result["n"] == int4_result["n"] == 60
    assert report["settings"]["checkpoints"] == [int4] and report["settings"]["suite"] == "quick"
    assert "| adversarial_robustness" in printed and "average of 1" in printed
    assert "dense: load" in printed and "adversarial_robustness" in printed.split("dense: load")[1]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["config"] for s in samples} == {"dense", "rtn-w4g32 (int4)"} and len(samples) == 120


def test_eval_refuses_what_cannot_be_compared(dense_and_int4, smollm2_tokenizer, tmp_path, capsys):
    dense, int4 = dense_and_int4
    assert cli_main(["eval", "--model", dense, "--compressed", dense, "--dimensions", "adversarial_robustness"]) == 2
    assert "not a compressed checkpoint" in capsys.readouterr().err
    assert cli_main(["eval", "--model", int4, "--compressed", int4, "--dimensions", "adversarial_robustness"]) == 2
    assert "already compressed" in capsys.readouterr().err
    assert cli_main(["eval", "--model", dense, "--dimensions", "honesty"]) == 2
    assert "unknown dimensions ['honesty']" in capsys.readouterr().err
    assert cli_main(["eval", "--model", dense, "--advglue", str(tmp_path / "dev.json")]) == 2
    assert "--advglue" in capsys.readouterr().err

    # a compressed checkpoint of another model: its answers say nothing about this one's compression
    other = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    other_dir = save_tiny(other, smollm2_tokenizer, tmp_path / "other")
    assert cli_main(["compress", "--model", other_dir, "--method", "rtn", "--group-size", "32", "--out",
                     str(tmp_path / "other-int4"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--model", dense, "--compressed", str(tmp_path / "other-int4"), "--dimensions",
                     "adversarial_robustness", "--ppl-max-tokens", "32", "--no-progress",
                     "--out", str(tmp_path / "r")]) == 2
    assert "architecture" in capsys.readouterr().err


def fake_row(name, scores, flips=None):
    results = [MetricResult("perplexity", "sample", "perplexity", 20.0, 100, "loglikelihood", False).as_dict()]
    for (dimension, score, ci, chance, reason), flip in zip(scores, flips or [None] * len(scores)):
        result = MetricResult(dimension, "probes", "accuracy", score, 50, "loglikelihood", ci95=ci, chance=chance,
                              uninformative_reason=reason, flip_rate=flip, mean_kl=None if flip is None else 0.01)
        results.append(result.as_dict())
    return {"name": name, "results": results, "sample": {"prompt": "q", "output": "a"}, "compression": None,
            "efficiency": {"prompt_tokens": 8, "weight_bytes": 2 ** 20, "peak_rss_bytes": 2 ** 21, "prefill_ms": 1.0,
                           "decode_tokens_per_s": 9.0, "runtime": "lean", "hf_decode_tokens_per_s": 7.0}}


def test_trust_table_marks_uninformative_dimensions_and_averages():
    dense = [("machine_ethics", 49.0, (40.0, 58.0), 50.0, None),     # interval holds chance
             ("fairness", 100.0, None, None, "predicts 'no' for every item"),
             ("toxicity", 80.0, None, None, None)]                  # no chance level: not judged
    int4 = [(d, s - 6, ci, c, r) for d, s, ci, c, r in dense]
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [fake_row("dense", dense), fake_row("int4", int4, flips=[0.25, 0.0, 0.1])]}
    text = markdown(report)
    assert "| machine_ethics † | 50.0 | 49.0 [40.0, 58.0] | 43.0 [40.0, 58.0] (flips 25.0%, KL 0.010) |" in text
    assert "† machine_ethics: uninformative for dense: its 95% interval contains the chance level" in text
    assert "† fairness: uninformative for dense: predicts 'no' for every item" in text
    assert "| toxicity | — | 80.0 | 74.0 (flips 10.0%, KL 0.010) |" in text
    assert "| **average of 3** |  | **76.3** | **70.3** |" in text


def test_efficiency_table_shows_decode_rss_above_the_no_model_process():
    dense, int4 = fake_row("dense", []), fake_row("int4", [])
    for row, peak in ((dense, 1073), (int4, 768)):
        row["efficiency"].update(decode_peak_rss_bytes=peak * 2 ** 20, process_baseline_rss_bytes=306 * 2 ** 20)
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [dense, int4]}
    text = markdown(report)
    assert "| dense | 20.00 | 1.0 | 2 | 1073 (767) | 1.0 | 9.0 | 7.0 |" in text
    assert "| int4 | 20.00 | 1.0 | 2 | 768 (462) | 1.0 | 9.0 | 7.0 |" in text
    assert "above the 306 MiB the process held once its last model was freed" in text
    assert "lean runtime cannot run" not in text
    del int4["efficiency"]["decode_peak_rss_bytes"]  # a report from before the decode-run peak was measured
    assert "| int4 | 20.00 | 1.0 | 2 | — | 1.0 | 9.0 | 7.0 |" in markdown(report)


def test_efficiency_note_says_which_greedy_tokens_came_through_the_head_screen():
    dense, int4 = fake_row("dense", []), fake_row("int4", [])
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [dense, int4]}
    assert "int8 copy of the fp32 output projection" not in markdown(report)  # not recorded: nothing said
    int4["efficiency"]["greedy_head"] = "screened"
    dense["efficiency"]["greedy_head"] = "full"
    assert "; for int4, each greedy token came from an int8 copy of the fp32 output projection" in markdown(report)
    dense["efficiency"]["greedy_head"] = "screened"
    assert "; for every configuration, each greedy token came from an int8 copy" in markdown(report)


def test_side_by_side_table_gives_the_interleaved_speeds_as_ratios():
    dense, int4, mixed = fake_row("dense", []), fake_row("int4", []), fake_row("mixed", [])
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [dense, int4, mixed]}
    assert "side by side" not in markdown(report).lower()  # not measured (a report from before): nothing said
    for row, rate in ((dense, 60.0), (int4, 240.0)):
        row["efficiency"].update(side_by_side_decode_tokens_per_s=rate, side_by_side_rounds=5)
    text = markdown(report)
    assert "| config | decode tok/s side by side | × dense |" in text
    assert "| dense | 60.0 | 1.00 |" in text and "| int4 | 240.0 | 4.00 |" in text
    assert "(5 rounds after a warm-up one; medians)" in text
    assert "not in it (no checkpoint form to load again): mixed." in text
    for row in (dense, int4, mixed):
        row["efficiency"] = {k: v for k, v in row["efficiency"].items() if not k.startswith("side_by_side")}
        row["efficiency"]["side_by_side_note"] = "not measured: too big"
    assert "Side-by-side decode speeds not measured: too big." in markdown(report)


def test_side_by_side_phase_is_skipped_with_a_reason_and_loses_nothing(monkeypatch):
    """Too little memory for every model at once, a row with no checkpoint form, or a model that fails to load
    again: the rows keep their evaluations and say why the phase did not run."""
    from comptrust import run as run_module

    def rows():
        return [fake_row("dense", []), fake_row("int4", [])]

    config = RunConfig(side_by_side_rounds=2, progress=False)
    monkeypatch.setattr(run_module, "available_memory_bytes", lambda: 3 * 2 ** 20)  # weights: 1 MiB each
    few = rows()
    run_module._side_by_side_speeds(few, ["a", "b"], config, PROMPT)
    assert few[0]["efficiency"]["side_by_side_note"] == ("not measured: the 2 models' 2 MiB of weights would take "
                                                          "more than half the 3 MiB available")
    one = rows()
    run_module._side_by_side_speeds(one, ["a", None], config, PROMPT)
    assert "fewer than two models load again" in one[1]["efficiency"]["side_by_side_note"]

    def fail(source, online=False):
        raise ModelLoadError(f"{source}: truncated")

    monkeypatch.setattr(run_module, "available_memory_bytes", lambda: None)
    monkeypatch.setattr(run_module, "load_model", fail)
    broken = rows()
    run_module._side_by_side_speeds(broken, ["a", "b"], config, PROMPT)
    assert broken[1]["efficiency"]["side_by_side_note"] == "not measured: a: truncated"
    assert "side_by_side_decode_tokens_per_s" not in broken[0]["efficiency"]
    assert "Side-by-side decode speeds not measured: a: truncated." in markdown(
        {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
         "configs": broken})


def test_efficiency_table_marks_speeds_taken_through_transformers():
    row = fake_row("dense", [])
    row["efficiency"].update(runtime="hf", runtime_note="model type 'gemma3_text' is not llama",
                             hf_decode_tokens_per_s=9.0)
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [row]}
    text = markdown(report)
    assert "| dense | 20.00 | 1.0 | 2 | — | 1.0 | 9.0 (HF) | 9.0 |" in text
    assert "the lean runtime cannot run this model (model type 'gemma3_text' is not llama)" in text


PROMPT = torch.arange(5)


def _serving(peak_mib: int, rate: float) -> dict:
    return {"baseline_rss_bytes": 226 * 2 ** 20, "load_peak_rss_bytes": 480 * 2 ** 20,
            "decode_peak_rss_bytes": peak_mib * 2 ** 20, "decode_tokens_per_s": rate}


def test_serving_table_gives_each_checkpoint_served_alone():
    dense, int4, mixed = fake_row("dense", []), fake_row("int4", []), fake_row("mixed", [])
    report = {"model": {"name": "m"}, "created": "now", "environment": {"torch": "2", "threads": 2, "cpu_backend": "x"},
              "configs": [dense, int4, mixed]}
    assert "serving process" not in markdown(report).lower()  # not measured (a report from before): nothing said
    dense["efficiency"]["serving"], int4["efficiency"]["serving"] = _serving(727, 62.5), _serving(360, 244.4)
    mixed["efficiency"]["serving_note"] = "not measured: no checkpoint form to serve"
    text = markdown(report)
    assert ("| config | serving decode RSS MiB | × dense | above torch MiB | load peak MiB | process peak MiB | × dense | "
            "decode tok/s there |") in text
    # the process peak is the larger of the load and decode peaks: int4's load peak (480) is its process peak here
    assert "| dense | 727 | 1.00 | 501 | 480 | 727 | 1.00 | 62.5 |" in text
    assert "| int4 | 360 | 0.50 | 134 | 480 | 480 | 0.66 | 244.4 |" in text
    assert "above the 226 MiB it held after its imports" in text
    assert "not in it: mixed (not measured: no checkpoint form to serve)." in text
    for row in (dense, int4):
        del row["efficiency"]["serving"]
        row["efficiency"]["serving_note"] = "not measured: no checkpoint form to serve"
    assert "Serving process: not measured: no checkpoint form to serve." in markdown(report)


def test_serving_phase_records_why_a_row_was_not_served(monkeypatch):
    from comptrust import run as run_module

    def serve(path, prompt_ids, decode_tokens, repeats):
        if path == "broken":
            raise RuntimeError("the serving process for broken failed (exit 2): error: truncated")
        assert prompt_ids == PROMPT.tolist() and (decode_tokens, repeats) == (4, 2)
        return {"checkpoint": path, "greedy_tokens": [5, 6], **_serving(300, 99.0)}

    monkeypatch.setattr(run_module, "measure_serving_process", serve)
    rows = [fake_row("dense", []), fake_row("int4", []), fake_row("mixed", []), fake_row("gemma", [])]
    gemma = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, hidden_act="gelu_pytorch_tanh"))
    assert not run_module._servable(gemma, rows[3])
    run_module._serving_processes(rows, ["ok", "broken", None, None], RunConfig(decode_tokens=4, speed_repeats=2),
                                  PROMPT)
    assert rows[0]["efficiency"]["serving"] == _serving(300, 99.0)  # the temporary folder's path dropped
    assert rows[1]["efficiency"]["serving_note"] == ("not measured: the serving process for broken failed (exit 2): "
                                                     "error: truncated")
    assert rows[2]["efficiency"]["serving_note"] == "not measured: no checkpoint form to serve"
    assert rows[3]["efficiency"]["serving_note"] == ("not measured: the lean runtime cannot run this model "
                                                     "(activation 'gelu_pytorch_tanh' is not silu)")
    assert all(row["results"] for row in rows)  # the evaluations stand
