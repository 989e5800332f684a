"""`overfill-serve eval` and its lm-eval model against a scripted stand-in server on 127.0.0.1 (the client side is
under test here; tests/test_eval.py runs the real app): what the adapter sends (continuation_start = each prompt's
context length, batched), that lm-eval reads the answers back, the table, the JSON, the plot, and the errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the extra `eval`)")

from overfill_serve.tools import evaluation, plots  # noqa: E402
from overfill_serve.tools.cli import main  # noqa: E402
from overfill_serve.tools.eval_tasks import TASKS_DIR  # noqa: E402

PAIR = "fake"
SCALE = {PAIR: 1.0, f"{PAIR}:full": 1.5, f"{PAIR}:pruned": 2.0}  # each mode's logprobs differ
ROWS = [json.loads(line) for line in (TASKS_DIR / "overfill_tiny.jsonl").read_text().splitlines()]
ANSWERS = {row["question"]: row["choices"][row["answer"]] for row in ROWS}


def logprob(token: int, position: int, model: str) -> float:
    return -(1 + (token + position) % 5) * SCALE[model]


def scored(ids: list[int], model: str, start: int | None) -> list[float | None]:
    """The stand-in's contract: OverFill with a continuation start k scores positions 1..k as the full mode
    does and k+1.. as its own; without k, everything on the full model (teacher-scoring semantics)."""
    out: list[float | None] = [None]
    for i in range(1, len(ids)):
        teacher = model == PAIR and (start is None or i <= start)
        out.append(logprob(ids[i], i, f"{PAIR}:full" if teacher else model))
    return out


def answer(prompt: str, model: str) -> str:
    """:full answers every question, :pruned none, OverFill the even-length ones."""
    question = prompt.rsplit("Question: ", 1)[1].split("\n")[0]  # the last one: after the few-shot examples
    right = model.endswith(":full") or (model == PAIR and len(question) % 2 == 0)
    return " " + (ANSWERS[question] if right else "no idea")


class StandIn(BaseHTTPRequestHandler):
    """Character tokens (id = code point); /tokenizer_info, /tokenize, /detokenize, /v1/models and
    /v1/completions as the app answers them. Every completion body is kept in `bodies`."""

    bodies: list[dict[str, Any]] = []
    tokenized: list[str] = []  # every text /tokenize was asked for

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/tokenizer_info":
            return self._json({"eos_token": "\n", "bos_token": None, "model_max_length": 512})
        if self.path != "/v1/models":
            return self._json({"error": {"message": "not found"}}, 404)
        self._json({"object": "list", "data": [{"id": m} for m in SCALE]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self.tokenized.append(body["prompt"])
            tokens = [ord(c) for c in body["prompt"]]
            return self._json({"count": len(tokens), "max_model_len": 512, "tokens": tokens})
        if self.path == "/detokenize":
            return self._json({"prompt": "".join(map(chr, body["tokens"]))})
        self.bodies.append(body)
        prompts = body["prompt"]
        starts = body.get("continuation_start", [None] * len(prompts))
        choices = [self._choice(i, ids, body, starts[i]) for i, ids in enumerate(prompts)]
        self._json({"object": "text_completion", "model": body["model"], "choices": choices})

    def _choice(self, index: int, ids: list[int], body: dict[str, Any], start: int | None) -> dict[str, Any]:
        text = "".join(map(chr, ids))
        if not body.get("echo"):
            return {"index": index, "text": answer(text, body["model"]), "finish_reason": "stop"}
        lps = [*scored(ids, body["model"], start), -0.5]  # the prompt, then one generated "."
        tokens = [chr(t) for t in ids] + ["."]
        top = [None if lp is None else {tok: lp} for tok, lp in zip(tokens, lps)]
        logprobs = {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top}
        return {"index": index, "text": text + ".", "logprobs": logprobs, "finish_reason": "length"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def context_length(ids: list[int]) -> int:
    """Where the continuation starts, read from the text itself: after "Answer:"."""
    text = "".join(map(chr, ids))
    return text.rindex("Answer:") + len("Answer:")


@pytest.mark.parametrize("concurrent", [1, 2], ids=["sequential", "concurrent"])  # two code paths in lm-eval
def test_eval_sends_each_context_length_and_reads_the_scores_back(url: str, concurrent: int) -> None:
    StandIn.bodies.clear()
    StandIn.tokenized.clear()
    run = evaluation.evaluate_modes(
        url, ["overfill_tiny_mc"], limit=5, batch_size=3, num_concurrent=concurrent, log=lambda _: None
    )
    assert run.pair == PAIR and list(run.outputs) == ["overfill", "full", "pruned"]
    texts = [t for t in StandIn.tokenized if t]  # ("" is how each mode reads the server's max_model_len)
    assert len(texts) == len(set(texts))  # each text once, for all three modes
    scoring = [b for b in StandIn.bodies if b.get("echo")]
    assert len(scoring) == 3 * 7  # 5 documents x 4 choices in batches of 3, per mode
    for body in scoring:
        assert (body["logprobs"], body["max_tokens"], body["model"] in SCALE) == (1, 1, True)
        assert body["continuation_start"] == [context_length(ids) for ids in body["prompt"]]
        assert 1 <= len(body["prompt"]) <= 3
    for mode, output in run.outputs.items():
        samples = output["samples"]["overfill_tiny_mc"]
        got = evaluation.request_loglikelihoods(samples)
        assert len(got) == 20
        model = evaluation.model_name(PAIR, mode)
        for sample in samples:
            for i, (context, continuation) in enumerate(sample["arguments"]):
                ids = [ord(c) for c in context + continuation]
                expected = sum(scored(ids, model, len(context))[len(context) :])  # type: ignore[arg-type]
                assert got[(sample["doc_id"], i)] == pytest.approx(expected)


def test_eval_table_json_and_plot(url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    main(
        ["eval", "--url", url, "--tasks", "overfill_tiny", "--output", str(out), "--plot-dir", str(tmp_path)]
    )
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", PAIR, f"{PAIR}:full", f"{PAIR}:pruned"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in printed[2:5]}
    assert set(rows) == {
        ("overfill_tiny_gen", "exact_match"),
        ("overfill_tiny_mc", "acc"),
        ("overfill_tiny_mc", "acc_norm"),
    }
    even = sum(len(q) % 2 == 0 for q in ANSWERS) / len(ANSWERS)
    assert rows[("overfill_tiny_gen", "exact_match")][::3] == [f"{even:.4f}", "1.0000", "0.0000"]
    results = json.loads(out.read_text())
    assert (results["pair"], list(results["modes"])) == (PAIR, ["overfill", "full", "pruned"])
    full = results["modes"]["full"]
    assert (full["model"], full["results"]["overfill_tiny_gen"]["exact_match,none"]) == (f"{PAIR}:full", 1.0)
    assert "samples" not in full
    pngs = list(tmp_path.glob("eval-*.png"))
    assert len(pngs) == (1 if plots.available() else 0)


def test_eval_errors(url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["eval", "--url", url, "--tasks", "overfill_tiny_mc", "--modes", "full,half", "--no-plots"])
    assert e.value.code == 2 and "unknown mode 'half'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", "--url", url, "--tasks", "overfill_tiny_mc,no_such_task", "--no-plots"])
    assert e.value.code == 2 and "named no_such_task (--include_path" in capsys.readouterr().err
    monkeypatch.setattr(evaluation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--url", url, "--tasks", "overfill_tiny_mc", "--no-plots"])
    assert e.value.code == 2 and "pip install 'overfill-serve[eval]'" in capsys.readouterr().err
