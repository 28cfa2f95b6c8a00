"""What each ``effx`` command does, over the front end (:mod:`effx.frontend`): each takes the parsed
arguments and returns the exit status. A usage error is raised as ``UsageError`` (or the library's
``PassConfigError`` / ``ShowError``), a failure of the work as another ``EffxError``; :func:`effx.cli.main`
turns them into one line and an exit status. Heavy modules are imported inside the commands, so that
``effx --help`` and ``effx run`` start without torch."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import frontend, show
from ..chat import ChatSession, input_lines, load_prompts
from ..data import offline_texts, training_prompts
from ..errors import EffxError
from ..frontend import UsageError


class SetupError(EffxError):
    """This install or machine lacks what the command needs (an extra, a GPU provider): exit 1."""


def _program(args) -> frontend.Runnable:
    """The model of ``--model`` captured and transformed by ``--passes``, checked before any work."""
    return frontend.load(frontend.resolve(args.model, args.passes, kernels=args.kernels, program=True))


def generate(args) -> int:
    from transformers import TextStreamer

    run = _program(args)
    program, tokenizer = run.program, run.tokenizer
    tracer = None
    if args.show:
        show.check_mode(args.show, run.plan.decode_mode)
        tracer = show.Tracer({}, run.num_layers)
    ids = run.batch(tokenizer.encode_chat(args.prompt, chat=not args.no_chat_template))
    streamer = None
    if not args.no_stream and tracer is None:
        streamer = TextStreamer(tokenizer.hf, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = program.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        streamer=streamer,
        on_token=None if tracer is None else tracer.on_token,
        stats=None if tracer is None else tracer.stats,
    )
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    if tracer is not None:
        _print_marked(tokenizer.hf, out[0, ids.shape[1] :].tolist(), tracer, args.show, run.num_layers)
    elif streamer is None:
        print(tokenizer.decode(out[0, ids.shape[1] :]))
    flops = program.flops(context=ids.shape[1] + new // 2)
    print(
        f"[effx] {new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s (prefill of {ids.shape[1]} included); "
        f"{sum(flops.values()) / 1e6:.1f} MFLOPs/token at context {ids.shape[1] + new // 2}",
        file=sys.stderr,
    )
    return 0


def _print_marked(tokenizer, new: list[int], tracer, mode: str, num_layers: int) -> None:
    eos = set(tokenizer.all_special_ids)
    n = next((i for i, t in enumerate(new) if t in eos), len(new))  # the stop token and padding after it
    text = show.pieces(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), new[:n])
    colour = show.use_colour(sys.stdout)
    print(show.render(text, tracer.marks[:n], mode, num_layers=num_layers, colour=colour))
    print(
        show.legend(tracer.marks[:n], mode, num_layers=num_layers, colour=show.use_colour(sys.stderr)),
        file=sys.stderr,
    )


def inspect(args) -> int:
    program = _program(args).program
    program.report(sys.stdout, context=args.context)
    if args.plan:
        print(program.plan.to_json())
    return 0


def export(args) -> int:
    from ..exporters import onnx as exporter
    from ..exporters.folder import check_target

    check_target(args.out_dir, args.force)  # before the model is loaded
    run = _program(args)
    start = time.perf_counter()
    out = exporter.export(
        run.program, args.out_dir, tokenizer=run.tokenizer.hf, progress=True, overwrite=args.force
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[effx] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _providers(choice: str):
    """ONNX Runtime's providers for ``--provider``: None (the runtime's choice) for auto."""
    from ..runtime import onnx as rt

    if choice == "cpu":
        return ["CPUExecutionProvider"]
    if choice == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SetupError(
                f"--provider cuda: this onnxruntime offers {ort.get_available_providers()}; "
                "install onnxruntime-gpu on a machine with an NVIDIA GPU"
            )
        return rt.default_providers()
    return None


def run(args) -> int:
    providers = _providers(args.provider)
    runnable = frontend.load(frontend.resolve(artifact=args.out_dir), providers=providers)
    tokenizer = runnable.tokenizer
    ids = runnable.batch(tokenizer.encode_chat(args.prompt, chat=not args.no_chat_template))
    start = time.perf_counter()
    out = runnable.generate(ids, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(tokenizer.decode(out[0, ids.shape[1] :].tolist()))
    provider = next(iter(runnable.generator.sessions.values())).get_providers()[0]
    print(
        f"[effx] {new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s (ONNX Runtime, {provider})",
        file=sys.stderr,
    )
    return 0


def chat(args) -> int:
    prompts = None
    if args.prompts is not None:
        try:
            prompts = load_prompts(args.prompts)
        except (OSError, ValueError) as e:
            raise UsageError(str(e)) from None
    source = frontend.resolve(args.model, args.passes, artifact=args.artifact, kernels=args.kernels)
    runnable = frontend.load(source)
    if args.show:
        show.check_mode(args.show, runnable.plan.decode_mode)

    def render(messages):
        return runnable.batch(runnable.tokenizer.encode_chat(messages))

    def generate(ids, on_token, stats):
        runnable.generate(
            ids, max_new_tokens=args.max_new_tokens, stats=stats, on_token=lambda t: on_token(int(t[0]))
        )

    session = ChatSession(
        render,
        generate,
        runnable.tokenizer.decode,
        passes=runnable.passes,
        show=args.show,
        num_layers=runnable.num_layers,
    )
    if prompts is not None:
        session.run_prompts(prompts)
    else:
        print(
            f"[effx chat] {session.passes or 'dense'}; /help for commands, /quit or Ctrl-D to leave",
            file=sys.stderr,
        )
        session.run(input_lines())
    return 0


def serve(args) -> int:
    from ..serve.server import Options, start

    source = frontend.resolve(args.model, args.passes, artifact=args.artifact, kernels=args.kernels)
    options = Options(
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        default_max_tokens=args.default_max_tokens,
        max_body=args.max_body,
        model_name=args.model_name,
        engine=args.engine,
    )
    name = options.model_name or source.path
    if args.replicas is not None:
        return _serve_replicas(args, source, options, name)
    if args.max_replicas is not None or args.replica_cpus is not None:
        raise UsageError("--max-replicas and --replica-cpus go with --replicas")
    server = start(source, options)
    print(f"[effx serve] {name} ({server.engine.kind}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.run()
    return 0


def _serve_replicas(args, source, options, name: str) -> int:
    import os

    try:
        from ..serve.ray import serve_here
    except ImportError as e:
        raise UsageError(f"--replicas needs Ray Serve: pip install 'effx[ray]' ({e})") from None
    cpus = args.replica_cpus or (max(1.0, (os.cpu_count() or 1) / args.replicas) if args.replicas else 1.0)
    where = f"http://{args.host}:{args.port}/v1"
    count = f"{args.replicas} replicas" if args.replicas else f"autoscaled replicas ({cpus:g} CPUs each)"
    print(f"[effx serve] {name} on Ray Serve, {count}, at {where}", file=sys.stderr)
    serve_here(source, options, replicas=args.replicas, max_replicas=args.max_replicas, num_cpus=cpus)
    return 0


def _read_prompts(path: str) -> list[str]:
    from pathlib import Path

    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise UsageError(f"cannot read --prompts: {e}") from None


def train_heads(args) -> int:
    from ..exit_heads import train_exit_heads

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers takes comma-separated integers, got {args.layers!r}") from None
    prompts = _read_prompts(args.prompts) if args.prompts else training_prompts()
    runnable = _program(args)
    rank = args.rank if args.rank is not None else runnable.program.info.hidden_size
    try:
        result = train_exit_heads(
            runnable.program, prompts, runnable.tokenizer.hf, layers=layers, rank=rank,
            generate=0 if args.text else args.new_tokens, max_tokens=args.tokens, loss=args.loss,
            vocab=args.vocab, vocab_k=args.vocab_k, epochs=args.epochs, path=args.out,
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(
        f"trained on {result['tokens']} positions ({result['source']}; {result['collect_seconds']:.0f} s to "
        f"collect), held out {result['heldout']}; rank {rank}, loss {result['loss']}"
        + (f", {result['vocab_k']} ids scored" if result["vocab_k"] else "")
    )
    print(f"{'exit':>5} {'agreement before':>17} {'after':>7} {'fit s':>6}")
    for e in result["layers"]:
        print(
            f"{e:>5} {result['agreement_before'][e]:17.3f} {result['agreement_after'][e]:7.3f} "
            f"{result['seconds'][e]:6.1f}"
        )
    print(f"wrote {args.out}; use it with:")
    shallow = min(result["layers"])
    reduce = f", vocab-reduce{{where=draft vocab={args.vocab} k={args.vocab_k}}}" if args.vocab else ""
    print(
        f'  --passes "early-exit{{layers={shallow} mode=self-speculative head=trained heads={args.out}}}{reduce}"'
    )
    return 0


def train_draft(args) -> int:
    from ..draft_branch import train_draft_branch

    if args.vocab_k < 0:
        raise UsageError(f"--vocab-k must be >= 0 (0: the whole vocabulary), got {args.vocab_k}")
    if args.text_tokens < 0:
        raise UsageError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    prompts = _read_prompts(args.prompts) if args.prompts else training_prompts()
    runnable = _program(args)
    program = runnable.program
    hidden = program.info.hidden_size
    if args.ffn is not None and not 1 <= args.ffn <= 4 * hidden:
        raise UsageError(f"--ffn must be in 1..{4 * hidden} (4x the hidden size), got {args.ffn}")
    try:
        result = train_draft_branch(
            program, prompts, runnable.tokenizer.hf, max_tokens=args.tokens, new_tokens=args.new_tokens,
            texts=offline_texts() if args.text_tokens else None, text_tokens=args.text_tokens, path=args.out, steps=args.steps, vocab_k=args.vocab_k or None, ffn=args.ffn, epochs=args.epochs,
            lr=args.lr, bf16={"auto": None, "float32": False, "bfloat16": True}[args.precision],
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    params = sum(t.numel() for t in result.layer.state_dict().values())
    share = params / max(1, sum(t.numel() for s in program.stages for t in s.graph.state_dict().values()))
    vocab = "the whole vocabulary" if result.vocab is None else f"{len(result.vocab)} ids"
    print(
        f"trained on {result.tokens} tokens ({result.source}; {result.collect_seconds:.0f} s to generate and "
        f"read, {result.seconds:.0f} s to fit), held out {result.heldout}; {params / 1e6:.2f}M parameters "
        f"({share:.1%} of the model's), drafting from {vocab}"
    )
    print("held-out acceptance (rounds whose first j drafts are all accepted):")
    print(f"{'j':>3} {'before':>7} {'after':>7}")
    for j, (b, a) in enumerate(zip(result.before, result.after, strict=True), 1):
        print(f"{j:>3} {b:7.3f} {a:7.3f}")
    print(f"accepted drafts per round of {result.steps}: {result.accepted_per_round:.2f}")
    print(f"wrote {args.out}; use it with:")
    print(f'  --passes "draft-branch{{weights={args.out} draft={result.steps + 1}}}"')
    return 0


def _bench_configs(args, bench):
    """The configurations of --passes and --sweep (None: the defaults), checked before the model loads."""
    if args.quantize and (args.passes or args.sweep):
        raise bench.BenchConfigError(
            "--quantize adds to the default configurations; with --passes, add it there"
        )
    if args.branch and (args.passes or args.sweep):
        raise bench.BenchConfigError(
            "--branch adds to the default configurations; with --passes, add it there"
        )
    if args.branch and not Path(args.branch).is_file():
        raise bench.BenchConfigError(f"--branch: no such file: {args.branch}")
    if not (args.passes or args.sweep):
        return None
    return bench.expand_configs(
        args.passes, args.sweep, calibrate=args.calibrate, max_configs=args.max_configs
    )


def bench(args) -> int:
    from .. import bench

    # everything that can be wrong with the arguments fails before the model loads
    configs = _bench_configs(args, bench)
    samples = bench.load_samples(args.data, args.prompts)
    if args.heldout_tokens < 2:
        raise bench.BenchConfigError(f"--heldout-tokens must be at least 2, got {args.heldout_tokens}")
    start = time.perf_counter()
    runnable = frontend.load(frontend.resolve(args.model, kernels=args.kernels, program=True))
    name, dense, tokenizer = runnable.source.path, runnable.program, runnable.tokenizer.hf
    if configs is None:
        quantize = bench.default_quantize(dense) if args.quantize == "auto" else args.quantize
        configs = bench.default_configs(name, dense, tokenizer, quantize=quantize, branch=args.branch)
    result = bench.run_bench(
        runnable.model,
        tokenizer,
        configs,
        samples,
        model_name=name,
        data=args.data,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        chat=not args.no_chat_template,
        heldout_tokens=args.heldout_tokens,
        seq_len=min(256, args.heldout_tokens),
        dense=dense,
    )
    paths = bench.write_outputs(result, args.out, plot=not args.no_plot)
    print(bench.format_table(result))
    if stacked := bench.format_stacked_table(result):
        print(stacked)
    print(bench.format_path_table(result))
    for kind, path in paths.items():
        print(f"[effx] {kind}: {path}", file=sys.stderr)
    print(f"[effx] bench took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _eval_tasks(args, harness):
    """lm-eval's task manager and the tasks of --tasks (task files as their configs, as lm-eval's own
    command line reads them); a task or directory that does not exist is a usage error."""
    from pathlib import Path

    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    include = [str(harness.TASKS_DIR)]
    if args.include_path is not None:
        if not Path(args.include_path).is_dir():
            raise UsageError(f"--include-path {args.include_path}: no such directory")
        include.append(args.include_path)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    files = [t for t in tasks if t.endswith((".yaml", ".yml"))]
    for t in files:
        if not Path(t).is_file():
            raise UsageError(f"--tasks {t}: no such task file")
    manager = TaskManager(include_path=include, verbosity="ERROR")
    missing = [t for t in tasks if t not in files and not manager.match_tasks([t])]
    if missing:
        raise UsageError(
            f"unknown task(s) {', '.join(missing)}; effx's local tasks: effx_aclsum_title, "
            "effx_aclsum_challenge, effx_pydoc (tag: effx); 'lm_eval ls tasks' lists lm-eval's"
        )
    tasks = [load_yaml(str(Path(t).absolute()), resolve_func=True) if t in files else t for t in tasks]
    return manager, tasks


def evaluate(args) -> int:
    """``effx eval``."""
    import json
    from pathlib import Path

    try:
        from .. import harness
    except ImportError as e:
        raise SetupError(f"effx eval needs lm-eval ({e}); pip install 'effx[lm-eval]'") from None
    from lm_eval import simple_evaluate
    from lm_eval.utils import make_table

    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    manager, tasks = _eval_tasks(args, harness)
    source = frontend.resolve(args.model, args.passes, artifact=args.artifact, kernels=args.kernels)
    if source.kind == "artifact":
        lm = harness.EffxLM(artifact=source.path, batch_size=args.batch_size)
    else:
        lm = harness.EffxLM(
            model=source.path, passes=args.passes, kernels=args.kernels, batch_size=args.batch_size
        )
    results = simple_evaluate(
        model=lm,
        tasks=tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        task_manager=manager,
        apply_chat_template=args.apply_chat_template,
    )
    print(make_table(results))
    print(
        f"[effx] {lm.description['passes'] or 'dense'} ({lm.description['backend']}): "
        f"{harness.format_stats(lm.stats())}"
    )
    if args.output:
        results.pop("samples", None)
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"[effx] results: {args.output}", file=sys.stderr)
    return 0


def passes(args) -> int:
    from ..passes import registered_passes

    registered = registered_passes()
    if not registered:
        print("no passes are registered in this install")
    for name, cls in sorted(registered.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<16} {doc[0] if doc else ''}")
    return 0
