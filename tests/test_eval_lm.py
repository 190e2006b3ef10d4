"""The lm-eval wrapper (eval/lm.py) on a tiny random checkpoint: every score equals a direct forward of the model,
batching and truncation do not change results, EOT prefixing is what the docstring says, generation equals greedy
decoding, and broken checkpoints are clear errors naming the path."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, save_model_only
from data.tokenizer import EOT, gpt2_encoding
from eval.lm import GrapeLM
from eval.load import load
from lm_eval.api.instance import Instance
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=48)

PAIRS = [
    ("Question: Which gas do plants take in?\nAnswer:", " carbon dioxide"),
    ("The cat sat on the", " mat"),
    ("", "An empty context is conditioned on EOT."),
    ("Trailing space moves to the continuation ", "here"),
    ("A long context" + " that repeats itself" * 20, " and ends."),   # longer than block_size: left-truncated
]


def requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():  # gains away from 1, so that a mis-wired norm cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    return save_model_only(model, tmp_path_factory.mktemp("run"), step=7)


@pytest.fixture(scope="module")
def lm(ckpt):
    return GrapeLM(checkpoint=str(ckpt), device="cpu", batch_size=4)


def direct_score(model, ctx, cont, max_length):
    """The definition: log P(cont | ctx) from one full forward, no batching, no hooks."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    logits, _ = model(torch.tensor([inp]), all_logits=True)
    logp = F.log_softmax(logits[0, len(inp) - len(cont):], dim=-1)
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_loglikelihood_equals_direct_forward(lm):
    enc = gpt2_encoding()
    out = lm.loglikelihood(requests(PAIRS), disable_tqdm=True)
    assert len(out) == len(PAIRS)
    for (ctx, cont), (logprob, greedy) in zip(PAIRS, out):
        if ctx == "":
            ctx_ids, cont_ids = [EOT], enc.encode(cont)
        else:
            stripped = ctx.rstrip()
            cont = ctx[len(stripped):] + cont
            whole = [EOT] + enc.encode(stripped + cont)
            ctx_ids = [EOT] + enc.encode(stripped)
            cont_ids = whole[len(ctx_ids):]
        expected, expected_greedy = direct_score(lm.model, ctx_ids, cont_ids, lm.max_length)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_continuation_longer_than_window_is_an_error(lm):
    with pytest.raises(ValueError, match="exceeds max_length"):
        lm.loglikelihood(requests([("x", " y" * 60)]), disable_tqdm=True)


@pytest.mark.parametrize("pe,kv_shift", [("rope", False), ("fox", True), ("grape_ap", True)])
def test_batch_size_does_not_change_results(ckpt, tmp_path, pe, kv_shift):
    """Right-padding inside a batch and the length-sorted order change nothing, for rotary and additive PEs."""
    if pe != "rope":
        torch.manual_seed(1)
        ckpt = save_model_only(GPT(GPTConfig(**TINY, pos_encoding=pe, kv_shift=kv_shift)), tmp_path / pe, step=1)
    results = [GrapeLM(checkpoint=str(ckpt), device="cpu", batch_size=bs).loglikelihood(requests(PAIRS), True)
               for bs in (1, 3, 16)]
    for other in results[1:]:
        for (a, ga), (b, gb) in zip(results[0], other, strict=True):
            assert a == pytest.approx(b, abs=1e-5) and ga == gb


def greedy_tokens(model, ids, n):
    """n greedy tokens by full forwards (no cache), argmax over GPT-2's 50,257 real rows."""
    out = list(ids)
    for _ in range(n):
        logits, _ = model(torch.tensor([out]))
        out.append(int(logits[0, -1, :50257].argmax()))
    return out[len(ids):]


def test_greedy_flag_is_true_exactly_for_the_models_own_continuation(lm):
    ids = [EOT] + gpt2_encoding().encode("Once upon a time")
    greedy = greedy_tokens(lm.model, ids, 4)
    other = greedy[:3] + [(greedy[3] + 1) % 50257]
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, ids, greedy), (None, ids, other)], disable_tqdm=True)
    assert yes and not no


def test_prefix_eot_option(ckpt, lm):
    assert lm.tok_encode("hello")[0] == EOT
    assert lm.tok_encode("hello", add_special_tokens=False)[0] != EOT
    assert lm.tok_encode("<|endoftext|>hello") == [EOT] + gpt2_encoding().encode("hello")  # not doubled
    plain = GrapeLM(checkpoint=str(ckpt), device="cpu", prefix_eot=False)
    assert plain.tok_encode("hello") == gpt2_encoding().encode("hello")
    pair = [("The cat sat on the", " mat")]
    with_eot, = lm.loglikelihood(requests(pair), True)
    without, = plain.loglikelihood(requests(pair), True)
    enc = gpt2_encoding()
    expected, _ = direct_score(plain.model, enc.encode("The cat sat on the"), enc.encode(" mat"), 48)
    assert without[0] == pytest.approx(expected, abs=1e-4)
    assert abs(with_eot[0] - without[0]) > 1e-6  # the prefix is really there
    # an empty context is [EOT] in both modes
    empty = [("", " mat")]
    assert lm.loglikelihood(requests(empty), True)[0][0] == pytest.approx(
        plain.loglikelihood(requests(empty), True)[0][0], abs=1e-6)


def test_max_length_option_feeds_longer_contexts(ckpt):
    long_pair = [("A long context" + " that repeats itself" * 20, " and ends.")]
    short = GrapeLM(checkpoint=str(ckpt), device="cpu")
    longer = GrapeLM(checkpoint=str(ckpt), device="cpu", max_length=200)
    assert longer.max_length == 200 and short.max_length == TINY["block_size"]
    enc = gpt2_encoding()
    ctx, cont = [EOT] + enc.encode(long_pair[0][0]), enc.encode(long_pair[0][1])
    assert len(ctx) + len(cont) < 200
    expected, _ = direct_score(longer.model, ctx, cont, 200)
    assert longer.loglikelihood(requests(long_pair), True)[0][0] == pytest.approx(expected, abs=1e-4)
    assert abs(short.loglikelihood(requests(long_pair), True)[0][0] - expected) > 1e-6  # truncation had an effect


def test_loglikelihood_rolling_scores_every_token_once(lm):
    enc = gpt2_encoding()
    short = "A short document that fits in one window."
    long = "Every token of a long document is scored exactly once, window after window. " * 9
    out = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate((short, long))],
                                   disable_tqdm=True)
    # short: one window, [EOT] + tokens
    ids = enc.encode(short)
    logits, _ = lm.model(torch.tensor([[EOT] + ids[:-1]]), all_logits=True)
    expected = F.log_softmax(logits[0], -1).gather(-1, torch.tensor(ids)[:, None]).sum().item()
    assert out[0] == pytest.approx(expected, abs=1e-4)
    # long: disjoint windows of max_length; token t is predicted from up to max_length preceding tokens
    ids, L = enc.encode(long), lm.max_length
    assert len(ids) > 2 * L
    total, seq = 0.0, [EOT] + ids
    for start in range(0, len(ids), L):
        end = min(start + L, len(ids))
        ctx_start = max(0, end - L)
        inp = seq[ctx_start:end]  # predicts seq[ctx_start + 1 .. end] = ids[ctx_start .. end - 1]
        logits, _ = lm.model(torch.tensor([inp]), all_logits=True)
        logp = F.log_softmax(logits[0], -1)
        targets = ids[ctx_start:end]
        rows = range(start - ctx_start, end - ctx_start)
        total += sum(logp[r, targets[r]].item() for r in rows)
    assert out[1] == pytest.approx(total, abs=1e-3)


def test_generate_until_is_greedy_with_stop_sequences(lm):
    ctx = "The capital of France is"
    ids = [EOT] + gpt2_encoding().encode(ctx)
    greedy = greedy_tokens(lm.model, ids, 8)  # the reference decodes without the KV cache
    text = gpt2_encoding().decode(greedy[: greedy.index(EOT) if EOT in greedy else 8])
    out, = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 8}), 0)], True)
    assert out == text and len(text) >= 4
    stop = text[2:4]
    cut, = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 8}), 0)], True)
    assert cut == text.split(stop)[0]
    with pytest.raises(NotImplementedError):
        lm.generate_until([Instance("generate_until", {}, (ctx, {"do_sample": True, "temperature": 1.0}), 0)], True)


def test_overrides_reach_the_config(ckpt):
    lm = GrapeLM(checkpoint=str(ckpt), device="cpu", rope_base=500.0)
    assert lm.model.config.rope_base == 500.0 and lm.info["overrides"] == {"rope_base": 500.0}
    with pytest.raises(CheckpointError, match="unknown key 'rope_bse'; did you mean 'rope_base'"):
        GrapeLM(checkpoint=str(ckpt), device="cpu", rope_bse=500.0)
    with pytest.raises(CheckpointError, match="'learning_rate' is a training key, not a model config field"):
        GrapeLM(checkpoint=str(ckpt), device="cpu", overrides=["learning_rate=1e-3"])
    with pytest.raises(CheckpointError, match="config override 'rope_base=fast': key 'rope_base' must be float"):
        GrapeLM(checkpoint=str(ckpt), device="cpu", overrides=["rope_base=fast"])


def test_load_gives_a_ready_model_with_its_config_device_and_precision(ckpt):
    """eval.load.load: overrides applied (the training length pinned to the checkpoint's), eval mode without
    gradients on the device asked for, the precision context for the dtype, and what results record."""
    loaded = load(ckpt.parent, overrides=["block_size=96"], device="cpu", dtype="bfloat16")
    assert loaded.model.config is loaded.config and (loaded.config.block_size, loaded.config.train_length) == (96, 48)
    assert loaded.device == torch.device("cpu") and next(loaded.model.parameters()).device == loaded.device
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    with loaded.amp:
        assert torch.is_autocast_enabled("cpu")
    assert loaded.info == dict(path=str(ckpt), step=7, tokens=0, config=loaded.config.to_dict(),
                               overrides={"block_size": 96}, trained_block_size=48)
    assert loaded.summary() == dict(path=str(ckpt), step=7, pos_encoding="rope", kv_shift=False, block_size=48,
                                    overrides={"block_size": 96})
    with pytest.raises(ValueError, match="dtype must be one of auto, bfloat16, float32, got 'fp8'"):
        load(ckpt, device="cpu", dtype="fp8")


def test_run_directory_means_newest_checkpoint(ckpt):
    info = load(ckpt.parent, device="cpu").info
    assert info["path"] == str(ckpt) and info["step"] == 7


def test_missing_and_incompatible_checkpoints_are_clear_errors(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load(tmp_path)
    bad = tmp_path / "ckpt_0000001"
    bad.mkdir()
    (bad / "meta.json").write_text((ckpt / "meta.json").read_text())
    with pytest.raises(CheckpointError, match="model.pt is missing"):
        load(bad)
    (bad / "model.pt").write_bytes((ckpt / "model.pt").read_bytes())
    meta = json.loads((ckpt / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "config": {**meta["config"], "no_such_field": 1}}))
    with pytest.raises(CheckpointError, match="not compatible.*no_such_field"):
        load(bad)
    (bad / "meta.json").write_text(json.dumps({**meta, "config": {**meta["config"], "pos_encoding": "fox"}}))
    with pytest.raises(CheckpointError, match="weights do not fit.*fgate"):
        load(bad)


def test_uniform_model_logprob_is_minus_log_vocab_per_token(tmp_path):
    """All-zero weights give all-zero logits: every continuation token costs exactly log(V)."""
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    lm = GrapeLM(model=model, device="cpu")
    (logprob, _), = lm.loglikelihood(requests([("The cat", " sat on the mat")]), True)
    n = len(gpt2_encoding().encode("The cat sat on the mat")) - len(gpt2_encoding().encode("The cat"))
    assert logprob == pytest.approx(-n * math.log(50304), rel=1e-6)
