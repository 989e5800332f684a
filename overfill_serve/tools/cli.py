"""`overfill-serve` command line: generate, check-pair, prune, fetch-default, eval, client, plan."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from overfill_serve.errors import OverfillError


def _add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefill-model", help="full (teacher) model directory; default: the embedded SmolLM2-135M"
    )
    p.add_argument("--decode-model", help="pruned (student) model directory; default: the prefill model")
    p.add_argument(
        "--kept-layers", help="depth-pruned student: firstlast | first | last | comma-separated ids"
    )


def _kept(value: str | None) -> str | list[int] | None:
    if value is None or value in ("firstlast", "first", "last"):
        return value
    return [int(x) for x in value.split(",")]


def _generate(args: argparse.Namespace) -> None:
    from overfill_serve import LLM, SamplingParams

    kept = _kept(args.kept_layers)
    llm = LLM(args.prefill_model, args.decode_model, kept_layers=kept, dtype=args.dtype, device=args.device)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, mode=args.mode)[0]
    else:
        out = llm.generate(args.prompt, params, mode=args.mode)[0]
    print(out.text)
    if args.verbose:
        m = out.metrics
        print(
            f"[{out.mode}] {len(out.token_ids)} tokens, finish={out.finish_reason}, "
            f"ttft={m.ttft:.3f}s, e2e={m.e2e:.3f}s",
            file=sys.stderr,
        )


def _check_pair(args: argparse.Namespace) -> None:
    from overfill_serve.model.pair import compare_pair
    from overfill_serve.model.spec import ModelSpec
    from overfill_serve.tools.default_model import default_model_dir

    prefill = args.prefill_model or default_model_dir()
    teacher = ModelSpec.from_dir(prefill)
    student = ModelSpec.from_dir(args.decode_model or prefill)
    rows = compare_pair(teacher, student, _kept(args.kept_layers))
    width = max(len(r.name) for r in rows)
    print(f"{'field':<{width}}  {'ok':<3} teacher | student")
    for r in rows:
        print(f"{r.name:<{width}}  {'yes' if r.ok else 'NO':<3} {r.teacher!r} | {r.student!r}")
    print(
        f"teacher: hidden {teacher.hidden_size}, {teacher.num_parameters() / 1e6:.1f}M params; "
        f"student: hidden {student.hidden_size}, {student.num_parameters() / 1e6:.1f}M params"
    )
    if not all(r.ok for r in rows):
        raise SystemExit(1)


def _prune(args: argparse.Namespace) -> None:
    from overfill_serve.model.prune import prune_model
    from overfill_serve.tools.progress import StageBars

    with StageBars(units={"calibrating": "tok", "reading weights": "file"}) as bars:
        report = prune_model(
            args.model,
            args.out,
            hidden_size=args.hidden_size,
            intermediate_size=args.intermediate_size,
            num_layers=args.num_layers,
            kept_layers=_kept(args.kept_layers),
            max_calibration_tokens=args.calibration_tokens,
            progress=bars,
        )
    print(
        f"wrote {report.out_dir}: hidden {report.teacher_hidden_size}->{report.student_hidden_size}, "
        f"intermediate {report.teacher_intermediate_size}->{report.student_intermediate_size}, "
        f"layers {report.teacher_num_layers}->{report.student_num_layers} (kept {list(report.kept_layers)}), "
        f"params {report.teacher_parameters / 1e6:.1f}M->{report.student_parameters / 1e6:.1f}M"
    )
    print("note: a pruned model must be distilled (OverFill training) before it decodes well.")


def _fetch_default(args: argparse.Namespace) -> None:
    from overfill_serve.tools.default_model import fetch_default
    from overfill_serve.tools.progress import StageBars

    with StageBars() as bars:
        path = fetch_default(force=args.force, progress=bars)
    print(path)


def _eval(args: argparse.Namespace) -> None:
    from overfill_serve.tools import evaluation, plots

    run = evaluation.evaluate_modes(
        args.url,
        _names(args.tasks),
        modes=_names(args.modes),
        pair=args.pair,
        include_path=args.include_path or (),
        limit=args.limit,
        batch_size=args.batch_size,
        num_concurrent=args.num_concurrent,
        num_fewshot=args.num_fewshot,
        verbose=args.verbose,
    )
    print(evaluation.format_table(run))
    if args.output:
        print(f"results: {evaluation.write_json(run, args.output, samples=args.log_samples)}")
    if args.no_plots:
        return
    if not plots.available():
        print(f"plots: {plots.MISSING}")
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    print(f"plots: {evaluation.write_plot(run, args.plot_dir / f'eval-{stamp}.png')}")


def _names(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="lm-eval tasks against a running app, in its overfill, full and pruned modes (extra `eval`)",
    )
    ev.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or tags)")
    ev.add_argument("--url", default="http://127.0.0.1:8000", help="the app's HTTP address")
    ev.add_argument("--modes", default="overfill,full,pruned", help="comma-separated: overfill, full, pruned")
    ev.add_argument("--pair", help="the served pair's name (default: the first model GET /v1/models lists)")
    ev.add_argument(
        "--include_path",
        "--include-path",
        action="append",
        help="a directory of task YAMLs (repeatable), e.g. the shipped overfill_serve/tools/eval_tasks",
    )
    ev.add_argument("--limit", type=float, help="documents per task (a fraction when below 1)")
    ev.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    ev.add_argument("--num-concurrent", type=int, default=1, help="requests in flight at once")
    ev.add_argument("--num-fewshot", type=int)
    ev.add_argument("--output", type=Path, help="write the results as JSON here")
    ev.add_argument("--log-samples", action="store_true", help="put every request's result in --output too")
    ev.add_argument("--plot-dir", type=Path, default=Path("eval-plots"), help="the PNG goes here")
    ev.add_argument("--no-plots", action="store_true", help="the table only")
    ev.add_argument("-v", "--verbose", action="store_true", help="show lm-eval's own log lines")
    ev.set_defaults(func=_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="overfill-serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a model pair")
    _add_pair_args(gen)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--mode", default="overfill", choices=["overfill", "full", "pruned"])
    gen.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("-v", "--verbose", action="store_true", help="print token count and timings to stderr")
    gen.set_defaults(func=_generate)

    check = sub.add_parser("check-pair", help="compare the KV layouts of a pair field by field")
    _add_pair_args(check)
    check.set_defaults(func=_check_pair)

    prune = sub.add_parser("prune", help="Minitron-style pruning of a model into an OverFill student")
    prune.add_argument("model", help="teacher model directory")
    prune.add_argument("out", help="student output directory")
    prune.add_argument("--hidden-size", type=int)
    prune.add_argument("--intermediate-size", type=int)
    prune.add_argument("--num-layers", type=int)
    prune.add_argument("--kept-layers", help="firstlast | first | last | comma-separated ids")
    prune.add_argument("--calibration-tokens", type=int, default=2048)
    prune.set_defaults(func=_prune)

    fetch = sub.add_parser("fetch-default", help="convert the embedded SmolLM2-135M-Instruct into the cache")
    fetch.add_argument("--force", action="store_true")
    fetch.set_defaults(func=_fetch_default)

    _add_eval_command(sub)
    from overfill_serve.tools.client_cli import add_client_command  # grpc, no torch

    add_client_command(sub)
    from overfill_serve.tools.plan_cli import add_plan_command  # stdlib + ModelSpec only, no torch

    add_plan_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except OverfillError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
