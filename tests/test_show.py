"""``--show exits|paths``: per-token marks read from the run-time stats as generate fills them (effx.show),
in effx generate and effx chat."""

import io
import re

import pytest
import torch
from conftest import tiny_model

import effx
from effx.chat import ChatSession
from effx.cli import main
from effx.passes import EarlyExit
from effx.show import Mark, ShowError, Tracer, check_mode, legend, pieces, render


def _feed(tracer, snapshots):
    """Call the tracer once per token, with the stats as the loop would have them at that emit."""
    for snap in snapshots:
        tracer.stats.clear()
        tracer.stats.update(snap)
        tracer.on_token()
    return tracer.marks


def test_lossy_exit_depths_per_token():
    # token 0 comes from the prefill (no exit_layers yet); token i from decode step i - 1
    snaps = [{}, {"exit_layers": [[3]]}, {"exit_layers": [[3], [8]]}, {"exit_layers": [[3], [8], [3]]}]
    marks = _feed(Tracer({}, 8), snaps)
    assert [m.depth for m in marks] == [8, 3, 8, 3]
    assert all(m.draft is None and m.fallback is None for m in marks)


def test_drafts_are_the_first_accepted_tokens_of_each_round():
    src = lambda a: {"lookup": {"accepted": a}, "exit": {"accepted": 0}}  # noqa: E731
    snaps = [{}]  # the prefill's token
    snaps += [{"steps": 1, "accepted": 2, "sources": src(2)}] * 3  # round 1: two drafts, then the model's
    snaps += [{"steps": 2, "accepted": 2, "sources": src(2)}]  # round 2: nothing accepted
    snaps += [{"steps": 3, "accepted": 3, "sources": src(3)}] * 2
    marks = _feed(Tracer({}, 4), snaps)
    assert [m.draft for m in marks] == [None, "lookup", "lookup", None, None, "lookup", None]
    assert all(m.fallback is None for m in marks)  # multi-position rounds: fallbacks are not attributed


def test_fallbacks_of_a_reduced_head_per_step():
    counts = [0, 1, 1, 2, 2]
    snaps = [{"head_positions": i + 1, "head_fallbacks": c} for i, c in enumerate(counts)]
    assert [m.fallback for m in _feed(Tracer({}, 4), snaps)] == [False, True, False, True, False]


def test_render_marks_in_plain_text_and_colours_on_a_terminal():
    marks = [Mark(8), Mark(3), Mark(8, draft="lookup"), Mark(8, fallback=True)]
    text = ["a", "b", "c", "d"]
    plain = render(text, marks, "paths", num_layers=8, colour=False)
    assert plain == "ab‹L2›c‹d:lookup›d‹f›"
    assert render(text, marks, "exits", num_layers=8, colour=False) == "ab‹L2›cd"
    coloured = render(text, marks, "paths", num_layers=8, colour=True)
    assert "\033[" in coloured and "‹" not in coloured
    assert re.sub("\033\\[[0-9;]*m", "", coloured) == "abcd"
    line = legend(marks, "paths", num_layers=8, colour=False)
    assert "‹L2› exit at layer 2 25%" in line and "all 8 layers 75%" in line
    assert "accepted draft 25%" in line and "full-head fallback 100%" in line


def test_pieces_split_the_text_per_token():
    vocab = {1: "he", 2: "llo", 3: " wor", 4: "ld"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert pieces(decode, [1, 2, 3, 4]) == ["he", "llo", " wor", "ld"]
    assert pieces(decode, []) == []


def test_show_modes_are_checked():
    check_mode("paths", "dense")
    check_mode("exits", "lossy")
    with pytest.raises(ShowError, match="no lossy early exits"):
        check_mode("exits", "dense")
    with pytest.raises(ShowError, match="one of"):
        check_mode("layers", "lossy")


def test_marks_follow_a_real_lossy_run():
    model = tiny_model("llama", layers=4, seed=1)
    prog = effx.transform(model, passes=[EarlyExit(layers=(1,), thresholds=(0.3,))])
    tracer = Tracer({}, 4)
    ids = torch.randint(3, prog.info.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    prog.generate(ids, max_new_tokens=12, eos_token_id=[], on_token=tracer.on_token, stats=tracer.stats)
    depths = [m.depth for m in tracer.marks]
    assert len(depths) == 12 and depths[0] == 4
    assert depths[1:] == [d[0] for d in tracer.stats["exit_layers"]]
    assert set(depths) <= {2, 4}


def test_generate_show_on_the_command_line(capsys):
    """effx generate --show: plain marks when stdout is not a terminal, the legend on stderr, and a mode
    that cannot apply is one line."""
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as path:
        tiny_model("llama", layers=4, seed=1).save_pretrained(path)
        tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(96)}, unk_token="w1"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w2", pad_token="w0").save_pretrained(path)
        argv = ["generate", "--model", path, "--max-new-tokens", "8", "--no-chat-template", "w5 w6 w7"]
        assert main([*argv, "--passes", "early-exit{layers=1 thresholds=0.0}", "--show", "exits"]) == 0
        out, err = capsys.readouterr()
        assert "‹L1›" in out and "\033[" not in out
        assert "‹L1› exit at layer 1" in err
        assert main([*argv, "--show", "exits"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("effx: error: --show exits")
        assert main([*argv, "--show", "paths"]) == 0
        assert "every one from the dense path" in capsys.readouterr().err


def test_chat_shows_the_marks_as_it_streams():
    out = io.StringIO()

    def generate(ids, on_token, stats):
        on_token(5)  # the prefill's token
        stats["exit_layers"] = []
        for depth, token in ((2, 6), (4, 7)):
            stats["exit_layers"].append([depth])
            on_token(token)

    session = ChatSession(
        lambda m: m, generate, lambda ids: "".join(f"<{i}>" for i in ids), out=out, show="exits", num_layers=4
    )
    session.ask("hi")
    text = out.getvalue()
    assert "<5><6>‹L1›<7>\n" in text
    assert "‹L1› exit at layer 1 33%" in text and "all 4 layers 67%" in text
