"""effx.serve.ray: two replicas of the server on a single-node Ray cluster, called as a client would (the
official openai client), each answering with the greedy tokens Program.generate gives."""

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import tiny_model

from effx import frontend
from effx.frontend import UsageError
from effx.testing import tiny_tokenizer

openai = pytest.importorskip("openai")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from effx.serve.ray import DEPLOYMENT, app, application  # noqa: E402 (ray extra)
from effx.serve.server import Options  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tiny_model("llama", layers=2).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(model_dir):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        source = frontend.resolve(str(model_dir), kernels="reference")
        serve.run(application(source, Options(max_batch=2), replicas=2), route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_with_the_greedy_tokens_of_program_generate(cluster, model_dir):
    status = serve.status().applications["default"].deployments[DEPLOYMENT]
    assert status.replica_states.get("RUNNING") == 2
    run = frontend.load(frontend.resolve(str(model_dir), kernels="reference"))
    client = openai.OpenAI(base_url=f"{cluster}/v1", api_key="none")
    model = str(model_dir)
    prompts = ["7 9 11", "3 5", "12 4 4 8", "6"]

    def ask(prompt):
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return answer.choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(ask, prompts * 2))
    for prompt, text in zip(prompts * 2, texts, strict=True):
        ids = list(run.tokenizer.encode(prompt, special=True))
        tokens = run.generate(run.batch(ids), max_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
        tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
        assert text == run.tokenizer.decode(tokens)
    streamed = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "7 9"}], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed)
    assert httpx.get(f"{cluster}/health").json()["status"] == "ok"
    assert httpx.post(f"{cluster}/v1/completions", content=b"{").status_code == 400


def test_the_serve_run_builder_checks_its_arguments_before_loading(model_dir):
    with pytest.raises(UsageError, match="unknown argument.*replica"):
        app({"model": str(model_dir), "replica": "2"})
    with pytest.raises(UsageError, match="replicas='two' is not a number"):
        app({"model": str(model_dir), "replicas": "two"})
    with pytest.raises(UsageError, match="replicas must be >= 0"):
        app({"model": str(model_dir), "replicas": "-1"})
    built = app({"model": str(model_dir), "replicas": "0", "max_replicas": "3", "max_batch": "4"})
    assert isinstance(built, serve.Application)
