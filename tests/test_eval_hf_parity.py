"""The check that can fail: on the same weights and requests, our lm-eval model ("grape") returns the same
per-request log-likelihoods as lm-eval's own `hf` model on the exported transformers model (within 1e-4), for
loglikelihood (with and without the EOT prefix) and loglikelihood_rolling, and both pick the same answers."""


import pytest
import torch

from checkpoint import save_model_only
from eval.lm import GrapeLM
from lm_eval.api.instance import Instance
from model import GPT, GPTConfig
from scripts import export_hf

PAIRS = [
    ("Question: Which gas do plants take in during photosynthesis?\nAnswer:", " carbon dioxide"),
    ("Question: Which gas do plants take in during photosynthesis?\nAnswer:", " oxygen"),
    ("A man is sitting on a roof. He", " starts pulling up roofing on a roof."),
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    ("", "An empty context is conditioned on the prefix token."),
    ("Context with a trailing space ", "moves it."),
    ("Long context" + " that keeps going and going" * 20, " to the end."),  # > 64 tokens: left-truncated
]
DOCS = ["A short document.", "A document longer than the window, scored in disjoint windows. " * 12]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(checkpoint dir, exported transformers dir) of a tiny Qwen3-order RoPE model with random gains."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=64, rope_base=500.0,
                          qk_norm_before_rotary=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
    root = tmp_path_factory.mktemp("parity")
    ckpt = save_model_only(model, root / "run", step=1)
    out, _, _ = export_hf.export(ckpt, root / "hf")
    return ckpt, out


def hf_lm(path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), tokenizer=str(path), device="cpu", batch_size=3, dtype="float32", **kw)


def ll(lm, pairs):
    return lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)


@pytest.mark.parametrize("prefix_eot", [False, True])
def test_loglikelihood_matches_lm_eval_hf(pair, prefix_eot):
    ckpt, hf_dir = pair
    ours = ll(GrapeLM(checkpoint=str(ckpt), device="cpu", batch_size=2, prefix_eot=prefix_eot), PAIRS)
    theirs = ll(hf_lm(hf_dir, add_bos_token=prefix_eot), PAIRS)
    for (a, ga), (b, gb), p in zip(ours, theirs, PAIRS, strict=True):
        assert a == pytest.approx(b, abs=1e-4), p
        assert ga == gb
    assert ours[0][0] != ours[1][0]  # distinct answers get distinct scores


def test_loglikelihood_rolling_matches_lm_eval_hf(pair):
    ckpt, hf_dir = pair
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    ours = GrapeLM(checkpoint=str(ckpt), device="cpu").loglikelihood_rolling(reqs, disable_tqdm=True)
    theirs = hf_lm(hf_dir).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)
