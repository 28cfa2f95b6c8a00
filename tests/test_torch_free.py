"""The torch-free deployment the README promises: effx installed with its core dependencies only (no extras)
into a plain venv, without the system's packages, runs an exported artifact with ``effx run`` and through
``effx.runtime.onnx``, with torch not importable there, to the tokens this venv's torch and ONNX backends
give. A new import on the ONNX path that needs torch (or a dependency left out of the core list) fails here.

The venv is built from this checkout's files by pip (from the package index and pip's cache): about 30 s.
"""

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import numpy as np
import torch

import effx
from effx.cli import main
from effx.exporters import onnx as exporter
from effx.runtime import onnx as ort_runtime
from effx.testing import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [[5, 6, 7, 8], [9, 3, 4, 10]]

RUN = """
import importlib.util, json, sys
import numpy as np
from effx.runtime import onnx as rt
out = rt.load(sys.argv[1]).generate(np.array(json.loads(sys.argv[2])), max_new_tokens=6, eos_token_id=[])
print(json.dumps({"tokens": out.tolist(), "torch": importlib.util.find_spec("torch") is not None,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))}))
"""


def _sources(dst: Path) -> Path:
    """What pip needs to build effx (pyproject.toml, README.md, effx/), copied, so that the build leaves
    nothing in the checkout."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    shutil.copytree(ROOT / "effx", dst / "effx", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return dst


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_an_artifact_runs_where_torch_is_not_installed(tmp_path, capsys):
    program = effx.transform(tiny_model("llama", layers=2, seed=4))
    artifact = exporter.export(program, tmp_path / "art", tokenizer=tiny_tokenizer(chat_template=False))
    expected = program.generate(torch.tensor(PROMPT), max_new_tokens=6, eos_token_id=[]).numpy()
    assert np.array_equal(
        ort_runtime.load(artifact).generate(np.array(PROMPT), max_new_tokens=6, eos_token_id=[]), expected
    )
    assert main(["run", str(artifact), "w5 w6 w7", "--max-new-tokens", "5", "--provider", "cpu"]) == 0
    text_here = capsys.readouterr().out

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False, clear=True)
    python = env_dir / "bin" / "python"
    # effx and the dependencies pyproject.toml declares, no extras: what `pip install effx` gives a deployment
    _run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(_sources(tmp_path / "src"))]
    )
    cannot = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert cannot.returncode != 0 and "No module named 'torch'" in cannot.stderr

    out = json.loads(_run([python, "-c", RUN, str(artifact), json.dumps(PROMPT)], cwd=tmp_path).stdout)
    assert out["torch"] is False and out["loaded"] == []
    assert np.array_equal(np.array(out["tokens"]), expected)
    # the console script, tokenizer and all
    run = _run(
        [
            env_dir / "bin" / "effx",
            "run",
            str(artifact),
            "w5 w6 w7",
            "--max-new-tokens",
            "5",
            "--provider",
            "cpu",
        ],
        cwd=tmp_path,
    )
    assert run.stdout == text_here and "tokens/s (ONNX Runtime, CPUExecutionProvider)" in run.stderr
    # a command that needs the torch extra says so, in one line
    needs = subprocess.run(
        [env_dir / "bin" / "effx", "inspect", "--model", "smollm2-135m"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert needs.returncode == 1 and "Traceback" not in needs.stderr, needs.stderr
    assert 'pip install "effx[torch]"' in needs.stderr
