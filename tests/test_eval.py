"""lm-eval through the real Ray Serve app (one Ray Serve for the module, two apps): `overfill-serve eval` on a
width-pruned pair (the CLI) and an identity pair (the function), and plain lm-eval `local-completions`.

What must hold per loglikelihood request (the sum of a choice's continuation logprobs):
- pruned pair: `:full` (teacher) != `:pruned` (student) != OverFill; OverFill == `:full` when the continuation
  is one token (the teacher scores the first continuation token) and != when it is longer (the student
  scores the rest on the teacher's KV);
- identity pair (student == teacher): all three equal;
- plain `local-completions` on the pair's own name (no continuation_start): equal to `:full`, the teacher
  scoring every token.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the extra `eval`)")

from serve_harness import (  # noqa: E402
    HTTP_PORT,
    load_app_config,
    pair_args,
    run_app,
    serve_pair,
    wait_until,
)

from overfill_serve.tools import evaluation, plots  # noqa: E402
from overfill_serve.tools.cli import main  # noqa: E402
from overfill_serve.tools.eval_tasks import TASKS_DIR  # noqa: E402

URL = f"http://127.0.0.1:{HTTP_PORT}"
WIDTH, IDENTITY = "width", "identity"
LIMIT = 6  # documents per task: 24 scored choices per mode
MC, GEN = "overfill_tiny_mc", "overfill_tiny_gen"
SAME = {"rel": 1e-5, "abs": 1e-4}  # fp32 on CPU, prompts batched differently
APART = 1e-3  # two models' sums differ by far more on random weights


def _health(prefix: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
    conn.request("GET", f"{prefix}/health")
    return conn.getresponse().status


@pytest.fixture(scope="module")
def served(pairs) -> Iterator[dict[str, Any]]:
    """The width pair's app at / and the identity pair's at /identity, on one Ray Serve."""
    config, _ = load_app_config()
    for _ in serve_pair(pairs["width"], WIDTH):
        grpc = config["grpc_options"]["grpc_servicer_functions"]
        run_app(pair_args(pairs["identity"], IDENTITY), IDENTITY, grpc, route_prefix=f"/{IDENTITY}")
        wait_until(lambda: _health(f"/{IDENTITY}") == 200, timeout=60, what="the identity app's /health 200")
        yield pairs


@pytest.fixture(scope="module")
def cli_run(served, tmp_path_factory) -> dict[str, Any]:
    """`overfill-serve eval` on the width pair, all modes, both tasks: its table, JSON (with samples), PNGs."""
    out = tmp_path_factory.mktemp("eval")
    printed = out / "stdout.txt"  # capsys is per test; the run is per module
    with printed.open("w") as stdout, contextlib.redirect_stdout(stdout):
        main(
            ["eval", "--url", URL, "--tasks", f"{MC},{GEN}", "--limit", str(LIMIT), "--batch-size", "4"]
            + ["--output", str(out / "results.json"), "--log-samples", "--plot-dir", str(out)]
        )
    return {
        "table": printed.read_text().splitlines(),
        "json": json.loads((out / "results.json").read_text()),
        "pngs": list(out.glob("eval-*.png")),
    }


def loglikelihoods(samples: list[dict[str, Any]]) -> dict[tuple[int, int], float]:
    got = evaluation.request_loglikelihoods(samples)
    assert len(got) == 4 * LIMIT  # four choices per document
    return got


def test_cli_scores_both_tasks_in_all_modes(cli_run) -> None:
    head, rule, *rows = cli_run["table"][:5]
    assert head.split() == ["task", "metric", WIDTH, f"{WIDTH}:full", f"{WIDTH}:pruned"]
    assert sorted(tuple(r.split()[:2]) for r in rows) == [(GEN, "exact_match"), (MC, "acc"), (MC, "acc_norm")]
    modes = cli_run["json"]["modes"]
    assert list(modes) == ["overfill", "full", "pruned"]
    for mode in modes.values():
        results = mode["results"]
        for task, metric in ((MC, "acc"), (MC, "acc_norm"), (GEN, "exact_match")):
            assert 0.0 <= results[task][f"{metric},none"] <= 1.0
        assert mode["n-samples"][MC]["effective"] == mode["n-samples"][GEN]["effective"] == LIMIT
    texts = {m: [s["resps"][0][0] for s in modes[m]["samples"][GEN]] for m in modes}
    assert all(isinstance(t, str) for ts in texts.values() for t in ts)
    # The student decodes after the teacher's first token: OverFill's text is not the teacher's throughout.
    assert texts["overfill"] != texts["full"] and texts["pruned"] != texts["full"]
    assert len(cli_run["pngs"]) == (1 if plots.available() else 0)


def _tokens(pair: Any) -> Any:
    """The pair's tokenizer, read locally: `encode(text)` as lm-eval encodes (no special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pair.teacher))
    return lambda text: tok(text, add_special_tokens=False).input_ids


def _continuation_tokens(encode: Any, context: str, continuation: str) -> int:
    """Tokens in a continuation as lm-eval splits it: encode(context + continuation) past encode(context)."""
    return len(encode(context + continuation)) - len(encode(context))


def test_pruned_pair_loglikelihoods_differ_where_they_must(served, cli_run) -> None:
    modes = cli_run["json"]["modes"]
    over, full, pruned = (loglikelihoods(modes[m]["samples"][MC]) for m in ("overfill", "full", "pruned"))
    encode = _tokens(served["width"])
    for s in modes["full"]["samples"][MC]:
        for i, (context, continuation) in enumerate(s["arguments"]):
            key = (s["doc_id"], i)
            # Every answer here is 2+ tokens (the one-token case is the next test): the student scores some.
            assert _continuation_tokens(encode, context, continuation) >= 2, key
            assert abs(full[key] - pruned[key]) > APART, key
            assert abs(over[key] - pruned[key]) > APART, key
            assert abs(over[key] - full[key]) > APART, key


def test_overfill_scores_a_one_token_continuation_on_the_teacher(served) -> None:
    """Straight through the lm-eval model: a one-token continuation is the teacher's alone in OverFill mode."""
    from lm_eval.api.instance import Instance

    from overfill_serve.tools.lm_eval_model import OverfillCompletions

    context, continuations = "Question: What is two plus two?\nAnswer", [" the", " is", " four", ":"]
    encode = _tokens(served["width"])
    lengths = [_continuation_tokens(encode, context, c) for c in continuations]
    assert lengths.count(1) == 3 and lengths[2] >= 2, lengths
    requests = [Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate(continuations)]
    scores = {}
    for mode in evaluation.MODES:
        lm = OverfillCompletions(
            base_url=f"{URL}/v1/completions", model=evaluation.model_name(WIDTH, mode), batch_size=4
        )
        scores[mode] = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    for i, n in enumerate(lengths):
        over, full, pruned = (scores[m][i] for m in evaluation.MODES)
        assert abs(full - pruned) > APART and abs(over - pruned) > APART
        if n == 1:
            assert over == pytest.approx(full, **SAME), continuations[i]
        else:
            assert abs(over - full) > APART, continuations[i]


def test_identity_pair_modes_score_alike(served) -> None:
    run = evaluation.evaluate_modes(f"{URL}/{IDENTITY}", [MC], limit=LIMIT, batch_size=4, log=lambda _: None)
    assert run.pair == IDENTITY and list(run.outputs) == ["overfill", "full", "pruned"]
    over, full, pruned = (loglikelihoods(run.outputs[m]["samples"][MC]) for m in run.outputs)
    assert over.keys() == full.keys() == pruned.keys()
    for key in full:
        assert over[key] == pytest.approx(full[key], **SAME) and pruned[key] == pytest.approx(
            full[key], **SAME
        )
    accs = {m: out["results"][MC]["acc,none"] for m, out in run.outputs.items()}
    assert len(set(accs.values())) == 1, accs


@pytest.mark.parametrize("tokenizer", ["local", "remote"])
def test_plain_local_completions_scores_on_the_teacher(served, cli_run, tokenizer) -> None:
    """lm-eval unchanged (its own `local-completions`, batched; the tokenizer read locally or through the
    server's /tokenizer_info, /tokenize, /detokenize): no continuation_start, so the pair's OverFill name
    scores every token on the teacher."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    where = (
        {"tokenizer": str(served["width"].teacher)}
        if tokenizer == "local"
        else {"tokenizer_backend": "remote"}
    )
    output = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{URL}/v1/completions", "model": WIDTH, **where},
        tasks=[MC],
        batch_size=4,
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
    )
    assert output is not None
    plain = loglikelihoods(output["samples"][MC])
    full = loglikelihoods(cli_run["json"]["modes"]["full"]["samples"][MC])
    assert plain.keys() == full.keys()
    for key in full:
        assert plain[key] == pytest.approx(full[key], **SAME), key
