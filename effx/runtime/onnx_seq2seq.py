"""Run an encoder-decoder ONNX artifact (``seq2seq.json``, :mod:`effx.exporters.onnx_seq2seq`) with numpy and
onnxruntime only: the same loop as ``Seq2SeqProgram.generate`` (:mod:`effx.runtime.seq2seq`), encoder
TokenDrop included."""

from __future__ import annotations

from pathlib import Path

import array_api_compat.numpy as XP
import numpy as np

from ..artifact import SEQ2SEQ_FILE, SEQ2SEQ_FORMAT, SEQ2SEQ_SCHEMA_VERSION, read_manifest, sha256
from ..errors import ArtifactError
from .seq2seq import generate

__all__ = ["OnnxSeq2Seq", "load_seq2seq"]


def load_seq2seq(out_dir: Path, providers=None) -> OnnxSeq2Seq:
    path = out_dir / SEQ2SEQ_FILE
    manifest = read_manifest(path, SEQ2SEQ_FORMAT, SEQ2SEQ_SCHEMA_VERSION)
    for key in ("info", "generation", "files", "drops", "special"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks {key!r}")
    info, files = manifest["info"], manifest["files"]
    needed = ["encoder.embed", "decoder.embed", "head"]
    needed += [f"encoder.layer.{i}" for i in range(info["encoder_layers"])]
    needed += [f"decoder.{k}.{i}" for i in range(info["decoder_layers"]) for k in ("cross", "layer")]
    needed += [f"encoder.score.{i}" for i in manifest["drops"]]
    needed += ["encoder.gather"] if manifest["drops"] else []
    needed += ["encoder.bias", "decoder.bias"] if info.get("relative_bias") else []
    for name in needed:
        entry = files.get(name)
        if not isinstance(entry, dict) or Path(str(entry.get("onnx"))).name != entry.get("onnx"):
            raise ArtifactError(f"{path} has no file for stage {name!r}")
        file = out_dir / entry["onnx"]
        if not file.is_file():
            raise ArtifactError(f"{file} is missing (stage {name})")
        if sha256(file) != entry.get("sha256"):
            raise ArtifactError(
                f"{file} does not match its checksum in {SEQ2SEQ_FILE}: the artifact is corrupt"
            )
    return OnnxSeq2Seq(out_dir, manifest, providers=providers)


class OnnxSeq2Seq:
    """An encoder-decoder artifact's sessions (opened on first use) and ``generate``."""

    def __init__(self, out_dir: Path, manifest: dict, *, providers=None):
        import onnxruntime as ort

        from .onnx_backend import _providers

        self.out_dir = Path(out_dir)
        self.info = dict(manifest["info"])
        self.generation = dict(manifest["generation"])
        self.drops = {int(i): float(k) for i, k in manifest["drops"].items()}
        self.special = tuple(int(x) for x in manifest["special"])
        self.dtype = np.dtype(self.info["dtype"])
        self._files = {name: entry["onnx"] for name, entry in manifest["files"].items()}
        self._providers = _providers(providers)
        self._opts = ort.SessionOptions()
        self._opts.log_severity_level = 3
        self._sessions: dict = {}

    def __repr__(self) -> str:
        return f"OnnxSeq2Seq({self.out_dir}, encoder drops={sorted(self.drops)})"

    def run(self, name: str, *args) -> tuple:
        import onnxruntime as ort

        if name not in self._sessions:
            sess = ort.InferenceSession(
                str(self.out_dir / self._files[name]), sess_options=self._opts, providers=self._providers
            )
            self._sessions[name] = (sess, [i.name for i in sess.get_inputs()])
        sess, inputs = self._sessions[name]
        feeds = {n: np.ascontiguousarray(a) for n, a in zip(inputs, args, strict=True)}
        return tuple(sess.run(None, feeds))

    def generate(
        self,
        input_ids,
        attention_mask=None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id=None,
        pad_token_id=None,
        stats=None,
        **kwargs,
    ):
        """Greedy decoding, as ``Seq2SeqProgram.generate``: numpy int64 ``[batch, 1 + new]``."""
        return generate(
            self.run,
            XP,
            self.dtype,
            input_ids,
            attention_mask,
            info=self.info,
            generation=self.generation,
            drops=self.drops,
            special=self.special,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            stats=stats,
            kwargs=kwargs,
        )
