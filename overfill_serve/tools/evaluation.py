"""`overfill-serve eval`: lm-eval tasks against a running overfill-serve app, in each of its modes.

One lm-eval run per mode, each through the `overfill-completions` model (`lm_eval_model.py`) on the model name
that selects the mode: `<pair>` (OverFill: the teacher scores the context and the first continuation token,
the student the rest; generation is OverFill's), `<pair>:full` (the teacher alone) and `<pair>:pruned` (the
student alone). The results come back as one table (a row per task and metric, a column per mode), as JSON,
and as a grouped-bar PNG when matplotlib is installed.

lm-eval is optional (the extra `eval`); `require_lm_eval()` raises `LmEvalMissingError` saying how to
install it.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from overfill_serve.errors import InvalidRequestError, OverfillError
from overfill_serve.request import Mode

MODES = tuple(m.value for m in Mode)  # overfill, full, pruned
INSTALL_HINT = "pip install 'overfill-serve[eval]'"
STDERR_SUFFIX = "_stderr"


class LmEvalMissingError(OverfillError, ImportError):
    """lm-eval, which `overfill-serve eval` runs, is not installed."""


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise LmEvalMissingError(f"overfill-serve eval needs lm-eval, which is not installed: {INSTALL_HINT}")


def model_name(pair: str, mode: str) -> str:
    """The served model name that selects `mode` (GET /v1/models lists them); `InvalidRequestError` if none."""
    return pair if Mode.parse(mode) is Mode.OVERFILL else f"{pair}:{mode}"


@dataclass
class EvalRun:
    """What `evaluate_modes` measured: lm-eval's output (`simple_evaluate`'s dict) per mode, in run order."""

    url: str
    pair: str
    tasks: list[str]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def scores(self) -> dict[tuple[str, str], dict[str, tuple[float, float | None]]]:
        """{(task, metric): {mode: (value, stderr or None)}}; a metric's filter is named unless it is "none"."""
        table: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}
        for mode, output in self.outputs.items():
            for task, metrics in output["results"].items():
                for key, value in metrics.items():
                    name, _, filt = key.partition(",")
                    if not filt or name.endswith(STDERR_SUFFIX) or not isinstance(value, (int, float)):
                        continue  # "alias" and other labels, and the stderrs (read beside their metric)
                    stderr = metrics.get(f"{name}{STDERR_SUFFIX},{filt}")
                    label = name if filt == "none" else f"{name} ({filt})"
                    err = float(stderr) if isinstance(stderr, (int, float)) else None
                    table.setdefault((task, label), {})[mode] = (float(value), err)
        return table

    def to_json(self, samples: bool = False) -> dict[str, Any]:
        modes = {}
        for mode, output in self.outputs.items():
            entry = {
                "model": model_name(self.pair, mode),
                "seconds": round(self.seconds.get(mode, math.nan), 3),
                **{k: output.get(k) for k in ("results", "n-samples", "versions", "higher_is_better")},
            }
            if samples:
                entry["samples"] = output.get("samples")
            modes[mode] = entry
        return {"url": self.url, "pair": self.pair, "tasks": self.tasks, "modes": modes}


def task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] = ()) -> Any:
    """lm-eval's TaskManager over `include_path` and the shipped tasks (`eval_tasks/`), without lm-eval's
    ~15 000 built-in tasks (5 s to index) when those have them all."""
    from lm_eval.tasks import TaskManager

    from overfill_serve.tools.eval_tasks import TASKS_DIR

    paths = list(dict.fromkeys([*(str(p) for p in include_path), str(TASKS_DIR)]))
    local = TaskManager(include_path=paths, include_defaults=False)
    if not _unknown(tasks, local.all_tasks):
        return local
    manager = TaskManager(include_path=paths)
    unknown = _unknown(tasks, manager.all_tasks)
    if unknown:
        raise InvalidRequestError(
            f"no lm-eval task, group or tag is named {', '.join(unknown)} (--include_path adds task YAMLs)",
            "tasks",
        )
    return manager


def _unknown(tasks: Sequence[str], known: list[str]) -> list[str]:
    """The task names (or glob patterns, or YAML files) that name nothing lm-eval knows."""
    return [t for t in tasks if not fnmatch.filter(known, t) and not Path(t).is_file()]


def evaluate_modes(
    url: str,
    tasks: Sequence[str],
    *,
    modes: Sequence[str] = MODES,
    pair: str | None = None,
    include_path: Sequence[str | Path] = (),
    limit: float | None = None,
    batch_size: int = 8,
    num_concurrent: int = 1,
    num_fewshot: int | None = None,
    log: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> EvalRun:
    """Run lm-eval's `tasks` against the app at `url` (http://host:port) in each mode; `pair`: the served pair's
    name (default: the first model GET /v1/models lists). `log` hears a line per mode started and done.
    lm-eval's own log lines are shown only when `verbose` (errors always)."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    from overfill_serve.tools.client import HTTPClient
    from overfill_serve.tools.lm_eval_model import COMPLETIONS_PATH, OverfillCompletions, server_root

    logging.getLogger("lm_eval").setLevel(logging.INFO if verbose else logging.ERROR)
    root = server_root(url)
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    client = HTTPClient(root)
    pair = pair or client.default_model()
    names = [model_name(pair, m) for m in modes]  # unknown modes fail here, before any work
    manager = task_manager(tasks, include_path)
    run = EvalRun(root, pair, list(tasks))
    shared = None  # the first mode's tokenizer: every text is tokenized once for all modes
    for i, (mode, name) in enumerate(zip(modes, names), 1):
        say(f"[{i}/{len(modes)}] {mode} ({name}): {', '.join(tasks)}")
        started = time.monotonic()
        lm = OverfillCompletions(
            base_url=root + COMPLETIONS_PATH,
            model=name,
            batch_size=batch_size,
            num_concurrent=num_concurrent,
            remote_tokenizer=shared,
        )
        shared = lm.tokenizer
        output = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot
        )
        if output is None:  # lm-eval returns None on ranks other than 0; there is one rank here
            raise OverfillError(f"lm-eval returned no results for {name}")
        run.outputs[mode], run.seconds[mode] = output, time.monotonic() - started
        say(f"[{i}/{len(modes)}] {mode} done in {run.seconds[mode]:.1f} s")
    return run


def format_table(run: EvalRun) -> str:
    """A row per task and metric, a column per mode: value ± stderr."""
    modes = list(run.outputs)
    head = ("task", "metric", *(model_name(run.pair, m) for m in modes))
    rows: list[tuple[str, ...]] = [head]
    for (task, metric), by_mode in sorted(run.scores().items()):
        rows.append((task, metric, *(_cell(by_mode.get(m)) for m in modes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(score: tuple[float, float | None] | None) -> str:
    if score is None:
        return "-"
    value, stderr = score
    return f"{value:.4f}" if stderr is None or not math.isfinite(stderr) else f"{value:.4f} ± {stderr:.4f}"


def write_json(run: EvalRun, path: str | Path, samples: bool = False) -> Path:
    from lm_eval.utils import handle_non_serializable

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run.to_json(samples), indent=2, default=handle_non_serializable) + "\n")
    return out


def write_plot(run: EvalRun, path: str | Path) -> Path:
    """Grouped bars: a group per task and metric, a bar per mode (needs matplotlib: `plots.available()`)."""
    from overfill_serve.tools import plots

    values = {
        f"{task}\n{metric}": {m: v for m, (v, _) in by_mode.items()}
        for (task, metric), by_mode in sorted(run.scores().items())
    }
    return plots.grouped_bars(path, values, "score", title=f"lm-eval on {run.pair} ({run.url})")


def request_loglikelihoods(samples: Iterable[dict[str, Any]]) -> dict[tuple[int, int], float]:
    """{(doc_id, request index): loglikelihood} of a loglikelihood task's logged samples (one request per
    choice of a multiple-choice document); generation samples have none."""
    out = {}
    for sample in samples:
        for i, response in enumerate(sample["resps"]):
            value = response[0] if response else None
            if isinstance(value, (tuple, list)) and value and isinstance(value[0], (int, float)):
                out[(int(sample["doc_id"]), i)] = float(value[0])
    return out
