"""Run an encoder-decoder ONNX artifact (``seq2seq.json``, :mod:`effx.exporters.onnx_seq2seq`) with numpy and
onnxruntime only: the same loop as ``Seq2SeqProgram.generate`` (:mod:`effx.runtime.seq2seq`), encoder
TokenDrop included."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import array_api_compat.numpy as XP
import numpy as np

from ..artifact import (
    SEQ2SEQ_FILE,
    SEQ2SEQ_FORMAT,
    SEQ2SEQ_SCHEMA_VERSION,
    TOKENIZER_DIR,
    check_folder,
    check_tokenizer,
    read_manifest,
    sha256,
)
from ..errors import ArtifactError
from .onnx_backend import session_providers
from .seq2seq import generate
from .stats import StatsArg

if TYPE_CHECKING:
    from .onnx_backend import Providers, Session

__all__ = ["OnnxSeq2Seq", "load_seq2seq"]


def load_seq2seq(out_dir: Path, providers: Providers | None = None) -> OnnxSeq2Seq:
    path = out_dir / SEQ2SEQ_FILE
    manifest = read_manifest(path, SEQ2SEQ_FORMAT, SEQ2SEQ_SCHEMA_VERSION)
    for key in ("info", "generation", "files", "drops", "special"):
        if key not in manifest:
            raise ArtifactError(f"{path} lacks {key!r}")
    info, files = manifest["info"], manifest["files"]
    _check_fields(manifest, path)
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
    check_folder(out_dir / TOKENIZER_DIR, manifest.get("tokenizer"), path)
    check_tokenizer(out_dir / TOKENIZER_DIR)
    return OnnxSeq2Seq(out_dir, manifest, providers=providers)


def _check_fields(manifest: dict[str, Any], path: Path) -> None:
    """The manifest's fields that the loop sizes arrays or loops by, checked for type and range."""

    def whole(value: Any, what: str, low: int = 1, high: int = 2**31 - 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ArtifactError(f"{path}: {what} must be an integer in [{low}, {high}], got {value!r}")
        return value

    info, files, drops = manifest["info"], manifest["files"], manifest["drops"]
    if (
        not isinstance(info, dict)
        or not isinstance(files, dict)
        or not isinstance(manifest["generation"], dict)
    ):
        raise ArtifactError(f"{path}: 'info', 'generation' and 'files' must be JSON objects")
    for key in ("encoder_layers", "decoder_layers"):
        whole(info.get(key), f"info {key}", 1, 4096)
    for key in ("hidden_size", "num_heads", "head_dim", "vocab_size", "max_positions"):
        whole(info.get(key), f"info {key}")
    if info.get("dtype") not in ("float32", "float16", "bfloat16"):
        raise ArtifactError(f"{path}: info dtype {info.get('dtype')!r} is not a float type")
    if not isinstance(drops, dict) or not all(
        isinstance(i, str) and i.isascii() and i.isdigit() and int(i) < info["encoder_layers"] for i in drops
    ):
        raise ArtifactError(
            f"{path}: 'drops' must map encoder layer numbers to the share kept, got {drops!r}"
        )
    for keep in drops.values():
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise ArtifactError(f"{path}: a token drop keeps a share in (0, 1], got {keep!r}")
    special = manifest["special"]
    if not isinstance(special, list):
        raise ArtifactError(f"{path}: 'special' must be a list of token ids")
    for t in special:
        whole(t, "a special token id", 0, info["vocab_size"] - 1)


class OnnxSeq2Seq:
    """An encoder-decoder artifact's sessions (opened on first use) and ``generate``."""

    def __init__(
        self, out_dir: Path, manifest: dict[str, Any], *, providers: Providers | None = None
    ) -> None:
        import onnxruntime as ort

        self.out_dir = Path(out_dir)
        self.info = dict(manifest["info"])
        self.generation = dict(manifest["generation"])
        self.drops = {int(i): float(k) for i, k in manifest["drops"].items()}
        self.special = tuple(int(x) for x in manifest["special"])
        self.dtype = np.dtype(self.info["dtype"])
        self._files = {name: entry["onnx"] for name, entry in manifest["files"].items()}
        self._providers = session_providers(providers)
        self._opts = ort.SessionOptions()
        self._opts.log_severity_level = 3
        self._sessions: dict[str, tuple[Session, list[str]]] = {}  # name -> (session, input names)

    def __repr__(self) -> str:
        return f"OnnxSeq2Seq({self.out_dir}, encoder drops={sorted(self.drops)})"

    def run(self, name: str, *args: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], ...]:
        import onnxruntime as ort

        if name not in self._sessions:
            file = self.out_dir / self._files[name]
            try:
                sess = ort.InferenceSession(str(file), sess_options=self._opts, providers=self._providers)
            except (ValueError, TypeError):  # the Python wrapper's own checks of the arguments
                raise
            except Exception as e:  # ONNX Runtime's Fail, InvalidProtobuf, InvalidGraph...
                text = (str(e).strip().splitlines() or [""])[0][:300]
                raise ArtifactError(
                    f"{file}: ONNX Runtime cannot load it ({type(e).__name__}: {text})"
                ) from None
            self._sessions[name] = (sess, [i.name for i in sess.get_inputs()])
        sess, inputs = self._sessions[name]
        feeds = {n: np.ascontiguousarray(a) for n, a in zip(inputs, args, strict=True)}
        return tuple(sess.run(None, feeds))

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        *,
        max_new_tokens: int | None = None,
        eos_token_id: Any = None,
        pad_token_id: Any = None,
        stats: StatsArg = None,
        **kwargs: Any,
    ) -> np.ndarray[Any, Any]:
        """Greedy decoding, as ``Seq2SeqProgram.generate``: numpy int64 ``[batch, 1 + new]``."""
        tokens: np.ndarray[Any, Any] = generate(
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
        return tokens
