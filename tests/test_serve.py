"""effx serve: the continuous-batching engine against Program.generate, and the server as a client sees it
(the official openai client, raw HTTP for bad requests) in a subprocess on a free localhost port."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import tiny_model

from effx import frontend
from effx.cli import main
from effx.cli.parser import build_parser
from effx.runtime.sampling import Sampler
from effx.testing import tiny_tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from effx.serve.engine import ContinuousEngine, Request, SerialEngine, batchable  # noqa: E402 (serve extra)
from effx.serve.metrics import Metrics  # noqa: E402
from effx.serve.text import TextStream  # noqa: E402

MODEL = "tiny"
POSITIONS = 4096  # room for requests that outlast every step of a test (ignore_eos, cancelled by the test)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    model = tiny_model("llama", layers=2)
    model.config.max_position_embeddings = POSITIONS
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)  # with a small chat template
    return path


@pytest.fixture(scope="module")
def run(model_dir):
    return frontend.load(frontend.resolve(str(model_dir), kernels="reference"))


def reference(run, ids: list[int], max_new: int, ignore_eos: bool = False) -> list[int]:
    """The greedy tokens Program.generate (or an artifact's generate) gives this prompt alone, up to its
    stop token (``ignore_eos``: all ``max_new`` of them)."""
    stop = {"eos_token_id": []} if ignore_eos else {}
    out = run.generate(run.batch(ids), max_new_tokens=max_new, do_sample=False, **stop)[
        0, len(ids) :
    ].tolist()
    return out[: out.index(2) + 1] if 2 in out and not ignore_eos else out


# -- the engine, in process --------------------------------------------------------------------------------


def _collect(engine, requests):
    done = threading.Event()
    results = [[] for _ in requests]
    ends = [None] * len(requests)

    def sink(i):
        def put(event):
            if event.token is not None:
                results[i].append(event.token)
            else:
                ends[i] = event
                if all(e is not None for e in ends):
                    done.set()

        return put

    for i, request in enumerate(requests):
        engine.submit(request, sink(i))
    assert done.wait(60)
    return results, ends


@pytest.mark.parametrize(("capacity", "initial"), [(40, 40), (64, 4)])
def test_engine_rows_join_leave_and_compact_with_the_tokens_of_each_request_alone(run, capacity, initial):
    # 3 rows at most, 7 requests: rows join while others decode and leave at different steps; a cache of
    # 40 slots fills up and is compacted (or one of 4 slots grows to 64, compacted on the way)
    engine = ContinuousEngine(
        run.backend(), max_batch=3, max_queue=8, metrics=Metrics(), capacity=capacity, initial_slots=initial
    )
    engine.start()
    try:
        prompts = [[5 + i, 9, 11 + 3 * i, 7][: 1 + i % 4] for i in range(7)]
        requests = [Request(p, 14 + 6 * (i % 3), ignore_eos=i % 2 == 0) for i, p in enumerate(prompts)]
        results, ends = _collect(engine, requests)
    finally:
        engine.close()
    for request, tokens, end in zip(requests, results, ends, strict=True):
        assert tokens == reference(run, request.prompt, request.max_new, request.ignore_eos)
        assert end.reason == ("stop" if tokens[-1] == 2 and not request.ignore_eos else "length")
    samples = {
        (s.name, s.labels.get("le")): s.value for s in engine.metrics.step_batch_size.collect()[0].samples
    }
    assert samples[("effx_step_batch_size_count", None)] > samples[("effx_step_batch_size_bucket", "2.0")] > 0


def test_a_short_request_does_not_wait_for_a_long_one(run):
    # the short one joins at the next step and leaves after its 4 tokens, while the long one goes on
    engine = ContinuousEngine(run.backend(), max_batch=2, max_queue=4, metrics=Metrics())
    ended = []
    engine.start()
    try:
        for name, request in (
            ("long", Request([5, 6], 300, ignore_eos=True)),
            ("short", Request([7], 4, ignore_eos=True)),
        ):
            engine.submit(request, lambda e, name=name: e.reason and ended.append(name))
        deadline = time.monotonic() + 60
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.close()
    assert ended == ["short", "long"]


def test_engine_refuses_what_it_cannot_hold_and_keeps_running(run):
    engine = ContinuousEngine(run.backend(), max_batch=2, max_queue=1, metrics=Metrics(), capacity=16)
    engine.start()
    try:
        results, ends = _collect(engine, [Request([5, 6, 7], max_new=20)])  # 23 > 16 slots
        assert ends[0].reason == "error" and "16 slots" in ends[0].error and results == [[]]
        results, ends = _collect(engine, [Request([5, 6], max_new=4, ignore_eos=True)])
        assert ends[0].reason == "length" and len(results[0]) == 4
    finally:
        engine.close()


def test_sampled_rows_are_reproducible_with_a_seed(run):
    engine = ContinuousEngine(run.backend(), max_batch=4, max_queue=8, metrics=Metrics())
    engine.start()
    sampler = Sampler(do_sample=True, temperature=1.5, top_p=0.9)
    try:
        requests = [Request([5, 6], max_new=10, sampler=sampler, seed=s) for s in (1, 1, 2)]
        results, _ = _collect(engine, requests)
    finally:
        engine.close()
    assert results[0] == results[1]
    ids = run.batch([5, 6])
    alone = run.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=1)
    assert results[0] == alone[0, 2 : 2 + len(results[0])].tolist()


def test_serial_engine_runs_a_drafting_pipeline_with_its_greedy_tokens(model_dir, run):
    drafting = frontend.load(frontend.resolve(str(model_dir), "prompt-lookup", kernels="reference"))
    assert not batchable(drafting.backend())
    engine = SerialEngine(drafting, max_queue=4, metrics=Metrics())
    engine.start()
    try:
        requests = [Request([5, 6, 5, 6], max_new=15), Request([7, 8], max_new=6, ignore_eos=True)]
        results, ends = _collect(engine, requests)
    finally:
        engine.close()
    assert results[0] == reference(run, [5, 6, 5, 6], 15)
    assert len(results[1]) == 6 and ends[1].reason == "length"
    # /metrics reports what the runtime decided: the same counts DecodeStats gives for these requests
    expected = {"drafted": 0, "accepted": 0, "rounds": 0}
    for request in requests:
        stats = {}
        stop = {"eos_token_id": []} if request.ignore_eos else {}
        drafting.generate(drafting.batch(request.prompt), max_new_tokens=request.max_new, stats=stats, **stop)
        for key in expected:
            expected[key] += stats[key]
    assert expected["drafted"] > 0
    text = engine.metrics.exposition().decode()
    for key, name in (("drafted", "proposed"), ("accepted", "accepted")):
        assert f"effx_draft_tokens_{name}_total {float(expected[key])}" in text
    assert f"effx_verify_rounds_total {float(expected['rounds'])}" in text
    assert "effx_exit_layers_count 0.0" in text  # lossless drafting exits nowhere


def test_metrics_record_exits_reduced_heads_and_cascades():
    from effx.runtime.stats import DecodeStats

    metrics = Metrics()
    metrics.record(DecodeStats(exit_layers=[[2, 4], [4]], head_positions=10, head_fallbacks=3))
    metrics.record(DecodeStats(small_tokens=5, large_tokens=2, drafted=None))
    text = metrics.exposition().decode()
    assert "effx_exit_layers_count 3.0" in text and "effx_exit_layers_sum 10.0" in text
    assert 'effx_exit_layers_bucket{le="2.0"} 1.0' in text
    assert "effx_reduced_head_positions_total 10.0" in text
    assert "effx_reduced_head_fallbacks_total 3.0" in text
    assert 'effx_cascade_tokens_total{model="small"} 5.0' in text
    assert 'effx_cascade_tokens_total{model="large"} 2.0' in text
    assert "effx_draft_tokens_proposed_total 0.0" in text


def test_continuous_engine_on_an_artifact_gives_its_generate_tokens(model_dir, tmp_path):
    out = tmp_path / "art"
    assert main(["export", "--model", str(model_dir), str(out)]) == 0
    artifact = frontend.load(frontend.resolve(artifact=str(out)))
    assert batchable(artifact.backend())
    engine = ContinuousEngine(artifact.backend(), max_batch=2, max_queue=4, metrics=Metrics())
    engine.start()
    try:
        prompts = [[5, 6, 7], [9], [10, 11]]
        results, _ = _collect(engine, [Request(p, max_new=10) for p in prompts])
    finally:
        engine.close()
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == reference(artifact, prompt, 10)


def test_start_loads_and_decodes_on_the_engine_thread_and_raises_what_loading_raised(
    model_dir, run, monkeypatch
):
    from effx.serve import server as serve

    loaded_on, load = [], serve.load

    def recording(source):
        loaded_on.append(threading.current_thread())
        return load(source)

    monkeypatch.setattr(serve, "load", recording)
    source = frontend.resolve(str(model_dir), kernels="reference")
    server = serve.start(source, serve.Options(max_batch=2))
    try:
        assert server.engine.alive
        decoded_on = []

        def sink(event):
            decoded_on.append(threading.current_thread())

        results, _ = _collect(server.engine, [Request([5, 9, 11], 6, ignore_eos=True)])
        server.engine.submit(Request([5], 1), sink)
        deadline = time.monotonic() + 30
        while not decoded_on and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        server.engine.close()
    assert not server.engine.alive
    assert results[0] == reference(run, [5, 9, 11], 6, ignore_eos=True)
    assert loaded_on[0] is decoded_on[0] is not threading.main_thread()

    def failing(source):
        raise RuntimeError("no such weights")

    monkeypatch.setattr(serve, "load", failing)
    with pytest.raises(RuntimeError, match="no such weights"):
        serve.start(source, serve.Options())


def test_text_stream_holds_back_partial_stop_strings_and_cuts_at_one():
    words = {1: "ab", 2: "c", 3: "STO", 4: "P", 5: "z"}
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), ["STOP"])
    assert [stream.push(t) for t in (1, 2, 3)] == ["ab", "c", ""]  # "STO" may begin the stop string
    assert stream.push(4) == "" and stream.stopped and stream.text == "abc"
    stream = TextStream(lambda ids: "".join(words[i] for i in ids), ["STOP"])
    assert [stream.push(t) for t in (3, 5)] == ["", "STOz"] and not stream.stopped


# -- the server, in a subprocess ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    port = _free_port()
    args = ["serve", "--model", str(model_dir), "--kernels", "reference", "--port", str(port)]
    # 2 rows and 4 places in the queue: the 4 concurrent clients below always fit, however fast rows join
    args += ["--max-batch", "2", "--max-queue", "4", "--model-name", MODEL, "--max-body", "4096"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "effx.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"effx serve exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "effx serve did not start"
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _wait_idle(url: str) -> None:
    """Until no row decodes and none waits (a cancelled stream's row leaves at the next step)."""
    deadline = time.monotonic() + 30
    while _metric(url, "effx_batch_size") or _metric(url, "effx_queue_length"):
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.05)


def test_models_health_and_metrics(server):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    assert [m["id"] for m in httpx.get(f"{server}/v1/models").json()["data"]] == [MODEL]
    text = httpx.get(f"{server}/metrics").text
    for name in ("effx_time_to_first_token_seconds_bucket", "effx_inter_token_latency_seconds_bucket",
                 "effx_queue_length", "effx_batch_size", "effx_prompt_tokens_total"):  # fmt: skip
        assert name in text


def test_chat_and_completions_equal_program_generate(server, client, run):
    _wait_idle(server)
    messages = [{"role": "user", "content": "w10 w11 w12"}]
    ids = run.tokenizer.encode_chat(messages)
    want = reference(run, ids, 20)
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == run.tokenizer.decode(want)
    assert answer.usage.prompt_tokens == len(ids) and answer.usage.completion_tokens == len(want)
    assert answer.choices[0].finish_reason == ("stop" if want[-1] == 2 else "length")

    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == run.tokenizer.decode(want)

    prompt_ids = run.tokenizer.encode("w20 w21", special=True)
    text = client.completions.create(model=MODEL, prompt="w20 w21", max_tokens=9, temperature=0)
    assert text.choices[0].text == run.tokenizer.decode(reference(run, prompt_ids, 9))


def test_concurrent_clients_get_their_own_greedy_tokens(server, client, run):
    _wait_idle(server)
    # 4 requests, 2 rows: two run, two wait and join as rows leave; lengths differ so rows leave apart
    prompts = [f"w{10 + i} w{30 + 2 * i} w{50 - i}" for i in range(4)]
    lengths = [40, 6, 25, 3]
    answers = [None] * 4

    def ask(i):
        answers[i] = client.completions.create(
            model=MODEL, prompt=prompts[i], max_tokens=lengths[i], temperature=0, stream=i % 2 == 0
        )
        if i % 2 == 0:
            answers[i] = "".join(c.choices[0].text for c in answers[i])
        else:
            answers[i] = answers[i].choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for prompt, n, answer in zip(prompts, lengths, answers, strict=True):
        assert answer == run.tokenizer.decode(reference(run, run.tokenizer.encode(prompt, special=True), n))


def _long_stream(http: httpx.Client, prompt: str):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": POSITIONS - 16, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    return http.stream("POST", "/v1/completions", json=body)


def test_a_client_that_leaves_cancels_its_row(server, client, run):
    _wait_idle(server)
    before = _metric(server, "effx_requests_cancelled_total")
    with httpx.Client(base_url=server, timeout=60) as http, _long_stream(http, "w10 w11") as response:
        assert response.status_code == 200
        got = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[6:]))
            if len(got) == 3:
                break
        assert all(g["choices"][0]["finish_reason"] is None for g in got)
    _wait_idle(server)
    assert _metric(server, "effx_requests_cancelled_total") == before + 1
    answer = client.completions.create(model=MODEL, prompt="w20 w21", max_tokens=4, temperature=0)
    assert answer.choices[0].text == run.tokenizer.decode(
        reference(run, run.tokenizer.encode("w20 w21", special=True), 4)
    )


def test_a_client_that_leaves_a_whole_answer_cancels_it_too(server):
    _wait_idle(server)
    before = _metric(server, "effx_requests_cancelled_total")
    body = {"model": MODEL, "prompt": "w10 w11", "max_tokens": POSITIONS - 16, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before the answer is complete
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    _wait_idle(server)
    assert _metric(server, "effx_requests_cancelled_total") == before + 1


def test_stop_strings_and_seeds(server, client, run):
    _wait_idle(server)
    prompt_ids = run.tokenizer.encode("w20 w21", special=True)
    full = run.tokenizer.decode(reference(run, prompt_ids, 12, ignore_eos=True))
    cut = full.split()[5]
    want = full[: full.index(cut)]  # the answer ends before the first place the stop string appears
    cancelled = _metric(server, "effx_requests_cancelled_total")
    for stream in (False, True):
        answer = client.completions.create(
            model=MODEL, prompt="w20 w21", max_tokens=12, temperature=0, stop=[cut, "w95 w95"],
            stream=stream, extra_body={"ignore_eos": True},
        )  # fmt: skip
        if stream:
            chunks = list(answer)
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = answer.choices[0].text, answer.choices[0].finish_reason
        assert text == want and reason == "stop"
    _wait_idle(server)
    assert _metric(server, "effx_requests_cancelled_total") == cancelled  # a stop string is no cancellation

    def sampled(seed):
        return (
            client.completions.create(
                model=MODEL, prompt="w20 w21", max_tokens=16, temperature=1.5, seed=seed
            )
            .choices[0]
            .text
        )

    assert sampled(3) == sampled(3)


def _first_event(response):
    """Read up to the stream's first event (its request has a row); returns the stream's lines, to be kept:
    a line iterator that is collected closes its connection, which cancels the request."""
    lines = response.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return lines


def test_a_full_queue_is_answered_429_with_retry_after(server, client):
    _wait_idle(server)
    with httpx.Client(base_url=server, timeout=60) as http, contextlib.ExitStack() as streams:
        running = [_first_event(streams.enter_context(_long_stream(http, f"w{10 + i} w5"))) for i in range(2)]
        for i in range(4):  # both rows decode (each has sent a token) and four wait (sent their headers)
            assert streams.enter_context(_long_stream(http, f"w{20 + i} w5")).status_code == 200
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model=MODEL, prompt="w5", max_tokens=2, temperature=0)
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "queue_full"
        del running  # kept open until here
    _wait_idle(server)
    assert httpx.get(f"{server}/health").status_code == 200


BAD = [
    (b'{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    (b'{"model": "other", "prompt": "w5"}', 404, "model_not_found"),
    (b'{"model": "tiny", "prompt": "w5", "max_tokens": 0}', 400, None),
    (b'{"model": "tiny", "prompt": "w5", "max_tokens": 100000}', 400, "context_length_exceeded"),
    (b'{"model": "tiny", "prompt": "w5", "n": 2}', 400, None),
    (b'{"model": "tiny", "prompt": ["w5", "w6"]}', 400, None),
    (b'{"model": "tiny", "prompt": "w5", "temperature": -1}', 400, None),
    (b'{"model": "tiny"}', 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny", "prompt": ""}', 400, None),
    (b'{"model": "tiny", "prompt": "' + b"w5 " * 3000 + b'"}', 413, "request_too_large"),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD)
def test_bad_requests_get_json_errors_and_the_server_lives(server, body, status, code):
    response = httpx.post(
        f"{server}/v1/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"] and error["type"] and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    assert httpx.get(f"{server}/health").status_code == 200


def test_an_oversized_body_without_a_length_is_refused_as_it_arrives(server):
    def chunks():  # no Content-Length: httpx sends it chunked
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"w5 " * 100
        yield b'"}'

    response = httpx.post(
        f"{server}/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server}/health").status_code == 200


def test_unknown_routes_and_chat_errors_are_json(server):
    response = httpx.get(f"{server}/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert 'effx_requests_total{endpoint="other",status="404"}' in httpx.get(f"{server}/metrics").text
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]
    response = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "wizard", "content": "w5"}]},
    )
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


# -- the command line ----------------------------------------------------------------------------------------


def test_serve_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in out
    assert "/v1/chat/completions" in out and "429" in out


def test_serve_usage_errors_exit_2(model_dir, capsys):
    assert main(["serve", "--artifact", str(model_dir), "--passes", "prompt-lookup"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(model_dir), "--max-batch", "0"])
    assert e.value.code == 2
    assert (
        main(["serve", "--model", str(model_dir), "--passes", "prompt-lookup", "--engine", "continuous"]) == 2
    )
    assert "--engine continuous cannot run 'prompt-lookup'" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--max-replicas", "2"]) == 2
    assert "--max-replicas and --replica-cpus go with --replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(model_dir), "--replicas", "-1"])
    assert e.value.code == 2
