"""scripts/export_hf.py's remote-code export: for every encoding (model.PE_CLASSES, NoPE, KV-shift, a composition)
the folder loads with AutoModelForCausalLM(trust_remote_code=True) and gives our logits, our greedy and sampled
generations, and with a left-padded batch each row's own unpadded result; it reloads unchanged after
save_pretrained, honours dtype on load, loads in a process that cannot import this repository (nor fla, triton or
kernels), and ships model.py / chunked_attention.py byte for byte with no import transformers would refuse."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from checkpoint import save_model_only
from helpers import REPO, tiny_model
from model import PE_CLASSES
from scripts import export_hf

CASES = [(pe, False) for pe in PE_CLASSES] + [("nope", False), ("fox", True), ("grape_m+grape_ap", False)]
VOCAB = 97  # helpers.tiny_config's vocabulary: ids 0..96
NEW_TOKENS = 6


def case_id(case):
    pe, kv_shift = case
    return pe + ("+kv_shift" if kv_shift else "")


def exported(tmp_path, pe, kv_shift=False, **kw):
    """(our model, the export folder) for helpers.tiny_model(pe, kv_shift) saved as a checkpoint at step 5."""
    model = tiny_model(pe, kv_shift)
    ckpt = save_model_only(model, tmp_path / "run", step=5, tokens=1280)
    out, arch, diff = export_hf.export(ckpt, tmp_path / "hf", **kw)
    assert arch == "GrapeForCausalLM" and diff <= 1e-5
    return model, out


def left_padded(rows, pad=0):
    """(ids, attention_mask) of token rows of different lengths, left-padded with `pad`."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def greedy(hf, ids, **kw):
    """transformers' greedy generate of NEW_TOKENS tokens, no end-of-text stop; the new tokens only."""
    out = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, **kw)
    return out[:, ids.size(1):]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@torch.no_grad()
def test_export_gives_our_logits_and_generations(tmp_path, case):
    model, out = exported(tmp_path, *case)
    hf = export_hf.reload(out)
    assert type(hf).__name__ == "GrapeForCausalLM" and hf.dtype == torch.float32
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 24), generator=g)
    ours, _ = model(idx, all_logits=True)
    assert (hf(idx).logits - ours).abs().max().item() <= 1e-5

    prompt = idx[:, :7]
    assert torch.equal(greedy(hf, prompt), model.generate(prompt, NEW_TOKENS)[:, 7:])

    rows = [idx[0, :7], idx[1, :3], idx[1, 3:8]]  # three lengths: three histories in one batch
    ids, mask = left_padded(rows)
    logits = hf(ids, attention_mask=mask).logits
    new = greedy(hf, ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone, _ = model(r[None], all_logits=True)
        assert (logits[i, ids.size(1) - len(r):] - alone[0]).abs().max().item() <= 1e-5
        assert (logits[i, :ids.size(1) - len(r)] == 0).all()  # padding is no token
        assert torch.equal(new[i], model.generate(r[None], NEW_TOKENS)[0, len(r):]), i


@torch.no_grad()
def test_sampling_end_of_text_and_cache_contract(tmp_path):
    """Sampling draws what GPT.generate draws under the same seed (temperature, top-k); eos_token_id stops a row
    and pads it; a mask that contradicts the cache is refused; beam search is refused by name."""
    model, out = exported(tmp_path, "grape_ap", kv_shift=True)
    hf = export_hf.reload(out)
    prompt = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    for temperature, top_k in ((1.0, None), (0.7, 20)):
        torch.manual_seed(7)
        ours = model.generate(prompt, NEW_TOKENS, temperature=temperature, top_k=top_k)
        torch.manual_seed(7)
        theirs = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=temperature,
                             top_k=top_k or 0, eos_token_id=None)
        assert torch.equal(theirs, ours)

    ours = model.generate(prompt, NEW_TOKENS)[:, 5:]
    eos = int(ours[0, 2])
    stop = hf.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=VOCAB - 1)
    row = stop[0, 5:].tolist()
    first = ours[0].tolist().index(eos)
    assert row[:first + 1] == ours[0, :first + 1].tolist() and set(row[first + 1:]) <= {VOCAB - 1}

    logits = hf(prompt, use_cache=True)
    with pytest.raises(ValueError, match="real tokens per row"):
        hf(prompt[:, :1], attention_mask=torch.zeros(3, 6, dtype=torch.long), past_key_values=logits.past_key_values)
    with pytest.raises(ValueError, match="only supports"):
        hf.generate(prompt, max_new_tokens=2, num_beams=2)
    with pytest.raises(TypeError, match="position_ids"):
        hf(prompt, position_ids=torch.arange(5)[None])


@torch.no_grad()
def test_save_pretrained_reloads_unchanged(tmp_path):
    model, out = exported(tmp_path, "grape_m+grape_ap")
    hf = export_hf.reload(out)
    hf.save_pretrained(tmp_path / "again")
    again = export_hf.reload(tmp_path / "again")
    for name in ("model.py", "chunked_attention.py", "configuration_grape.py", "modeling_grape.py"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    a, b = hf.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, VOCAB, (2, 16))
    assert torch.equal(hf(idx).logits, again(idx).logits)


@torch.no_grad()
def test_dtype_is_honoured_on_load(tmp_path):
    """A bf16 export loads in bf16 by default and in fp32 on request (dtype, or the older torch_dtype), where it gives
    the logits of our model with bf16-rounded weights; bf16 runs close to those."""
    model, out = exported(tmp_path, "fox", kv_shift=True, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rounded = export_hf.saved_weights_model(model, "bfloat16")
    idx = torch.randint(0, VOCAB, (2, 20))
    ours, _ = rounded(idx, all_logits=True)
    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert bf16.dtype == torch.bfloat16
    assert (bf16(idx).logits.float() - ours).abs().max().item() < 0.1 * ours.abs().max().item()
    for kw in (dict(dtype=torch.float32), dict(torch_dtype=torch.float32)):
        fp32 = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kw)
        assert fp32.dtype == torch.float32
        assert (fp32(idx).logits - ours).abs().max().item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
@torch.no_grad()
def test_export_runs_on_cuda(tmp_path):
    model, out = exported(tmp_path, "grape_ap", kv_shift=True)
    hf = export_hf.reload(out).to("cuda")
    rows = [torch.arange(1, 8), torch.arange(3, 6)]
    ids, mask = left_padded(rows)
    new = greedy(hf, ids.cuda(), attention_mask=mask.cuda()).cpu()
    for i, r in enumerate(rows):
        assert torch.equal(new[i], model.generate(r[None], NEW_TOKENS)[0, len(r):])


def test_shipped_code_is_ours_and_needs_only_torch_and_transformers(tmp_path):
    """The code files are the repository's, byte for byte; every relative import is shipped; every other import
    that transformers' check_imports would require (those outside try/except) is the standard library, torch or
    transformers, so optional kernels (fla, triton, kernels) never block a load."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    _, out = exported(tmp_path, "alibi")
    shipped = {p.name for p in out.glob("*.py")}
    assert shipped == {f.name for f in export_hf.REMOTE_CODE_FILES}
    for file in export_hf.REMOTE_CODE_FILES:
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name
        assert {f"{m}.py" for m in get_relative_imports(out / file.name)} <= shipped, file.name
        required = set(get_imports(out / file.name)) - set(sys.stdlib_module_names)
        assert required <= {"torch", "transformers"}, (file.name, required)
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == export_hf.AUTO_MAP and config["model_type"] == "grape_pe"
    assert config["grape"]["train_length"] == config["grape"]["block_size"] == 32  # pinned, as eval.load does


# A child with neither the repository nor the optional kernels importable: it loads the export and prints what the
# parent compares with its own model.
CHILD = r"""
import importlib.util, json, sys
for name in ("fla", "triton", "kernels"):  # as if not installed: find_spec gives None, import raises ImportError
    sys.modules[name] = None
assert importlib.util.find_spec("model") is None and importlib.util.find_spec("chunked_attention") is None
import torch
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
idx = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = hf(idx).logits
    new = hf.generate(idx, max_new_tokens=4, do_sample=False, eos_token_id=None)[:, idx.size(1):]
print(json.dumps(dict(logits=logits[:, -1].tolist(), new=new.tolist(), module=type(hf).__module__)))
"""


@pytest.mark.slow
@torch.no_grad()
def test_export_loads_without_this_repository(tmp_path):
    model, out = exported(tmp_path, "fox", kv_shift=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    idx = torch.randint(0, VOCAB, (2, 9))
    done = subprocess.run([sys.executable, "-c", CHILD, str(out), json.dumps(idx.tolist())], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.")
    assert str(REPO) not in got["module"]
    ours, _ = model(idx)
    assert (torch.tensor(got["logits"]) - ours[:, -1]).abs().max().item() <= 1e-5
    assert got["new"] == model.generate(idx, 4)[:, 9:].tolist()
    assert Path(tmp_path / "modules").is_dir()  # the code was imported from the export's copy, not from here


# ---------------------------------------------------------------------------------- a trained run, card, Hub, errors


@pytest.mark.slow
@torch.no_grad()
def test_a_trained_run_exports_with_its_results_on_the_card(shards, tmp_path):
    """FoX + KV-shift trained on GPT-2 tokens of the sample: the export of the run directory (its newest checkpoint)
    gives our logits and greedy tokens, ships GPT-2's tokenizer, and its card states the run's validation loss."""
    from eval.load import load
    from helpers import train_in_process, train_metrics

    run = tmp_path / "run"
    with torch.enable_grad():
        train_in_process(shards, run, "--pos_encoding=fox", "--kv_shift=true", "--max_steps=6", "--eval_interval=3",
                         "--checkpoint_interval=6", "--val_tokens=4096")
    out, arch, diff = export_hf.export(run, tmp_path / "hf")
    assert arch == "GrapeForCausalLM" and diff <= 1e-5
    model = load(run, device="cpu").model
    hf = export_hf.reload(out)
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(3))
    assert (hf(idx).logits - model(idx, all_logits=True)[0]).abs().max().item() <= 1e-5
    assert torch.equal(greedy(hf, idx[:, :10]), model.generate(idx[:, :10], NEW_TOKENS)[:, 10:])

    from data.tokenizer import gpt2_encoding
    from transformers import AutoTokenizer

    text = "The history of science is the study of the development of science."
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # config.json's auto_map asks for it
    assert tokenizer(text)["input_ids"] == gpt2_encoding().encode(text)
    prompts = ["The history of", "A short prompt that is longer"]  # the card's batched generation, left-padded
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    new = greedy(hf, batch["input_ids"], attention_mask=batch["attention_mask"])
    for row, prompt in zip(new, prompts):
        ids = torch.tensor([gpt2_encoding().encode(prompt)])
        assert torch.equal(row, model.generate(ids, NEW_TOKENS)[0, ids.size(1):]), prompt
    card = (out / "README.md").read_text()
    val = train_metrics(run, "val")[-1]
    assert val["step"] == 6 and f"Validation loss at step 6" in card and f"**{val['val_loss']:.4f}**" in card
    assert "FoX" in card and "`kv_shift = true`" in card and "trust_remote_code=True" in card
    assert f"pretrained={out},trust_remote_code=True" in card  # the lm_eval command
    assert f'AutoTokenizer.from_pretrained("{out}", trust_remote_code=True)' in card
    assert "No zero-shot evaluation is recorded" in card
    info = json.loads((out / export_hf.EXPORT_INFO).read_text())
    assert info["step"] == 6 and info["remote_code"] and info["max_abs_logit_difference_fp32"] == diff


def test_a_random_checkpoint_card_says_nothing_is_recorded(tmp_path):
    _, out = exported(tmp_path, "grape_ap")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "GRAPE-AP" in card
    assert "No validation loss is recorded" in card and "No zero-shot evaluation is recorded" in card
    assert "psi_h(t, l) = s_h * logsigmoid(e_h(t, l))" in card  # model.py's own description of the encoding
    assert "no transformers architecture computes this model" in card


class FakeHub:
    """huggingface_hub.HfApi's two calls the export makes, recorded; `fail` makes the upload raise."""
    calls = []
    fail = False

    def create_repo(self, repo_id, **kw):
        FakeHub.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, **kw):
        FakeHub.calls.append(("upload_folder", kw))
        if FakeHub.fail:
            raise OSError("offline")
        return types.SimpleNamespace(commit_url=f"https://huggingface.co/{kw['repo_id']}/commit/abc")


def test_push_to_hub_uploads_the_finished_folder(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(FakeHub, "calls", [])
    ckpt = save_model_only(tiny_model("fox"), tmp_path / "run", step=2)
    assert export_hf.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--push-to-hub", "me/tiny-fox",
                           "--private"]) == 0
    assert "pushed to https://huggingface.co/me/tiny-fox/commit/abc" in capsys.readouterr().out
    (_, repo, kw), (_, upload) = FakeHub.calls
    assert repo == "me/tiny-fox" and kw == dict(repo_type="model", private=True, exist_ok=True)
    assert upload["folder_path"] == str(tmp_path / "hf") and upload["repo_id"] == "me/tiny-fox"
    assert 'from_pretrained("me/tiny-fox", trust_remote_code=True' in (tmp_path / "hf" / "README.md").read_text()

    monkeypatch.setattr(FakeHub, "fail", True)
    assert export_hf.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf2"), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "pushing" in err and "OSError: offline" in err and f"the export is complete in {tmp_path / 'hf2'}" in err
    assert (tmp_path / "hf2" / "config.json").is_file()


def test_bad_checkpoints_and_output_folders_are_clear_errors(tmp_path, capsys):
    def run(*args):
        status = export_hf.main([str(a) for a in args])
        return status, capsys.readouterr().err

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.json").write_text("{}")
    status, err = run("--checkpoint", empty_run, "--out", tmp_path / "hf")
    assert status == 2 and str(empty_run) in err and "checkpoint" in err and "Traceback" not in err

    ckpt = save_model_only(tiny_model("alibi"), tmp_path / "run", step=3)
    broken = tmp_path / "broken" / ckpt.name
    shutil.copytree(ckpt, broken)
    (broken / "meta.json").unlink()
    status, err = run("--checkpoint", broken, "--out", tmp_path / "hf")
    assert status == 2 and "meta.json" in err

    foreign = tmp_path / "foreign" / ckpt.name
    shutil.copytree(ckpt, foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    meta["config"]["pos_encoding"] = "xpos"
    (foreign / "meta.json").write_text(json.dumps(meta))
    status, err = run("--checkpoint", foreign, "--out", tmp_path / "hf")
    assert status == 2 and "pos_encoding" in err and "xpos" in err
    assert not (tmp_path / "hf").exists()

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    status, err = run("--checkpoint", ckpt, "--out", taken)
    assert status == 2 and "exists and is not empty" in err and "--force" in err
    status, err = run("--checkpoint", ckpt, "--out", taken, "--force")
    assert status == 2 and "holds no export_info.json" in err
    assert (taken / "notes.txt").read_text() == "mine" and sorted(p.name for p in taken.iterdir()) == ["notes.txt"]

    assert run("--checkpoint", ckpt, "--out", tmp_path / "hf")[0] == 0
    first = (tmp_path / "hf" / "model.safetensors").read_bytes()
    status, err = run("--checkpoint", ckpt, "--out", tmp_path / "hf")
    assert status == 2 and "exists and is not empty" in err
    assert run("--checkpoint", ckpt, "--out", tmp_path / "hf", "--force")[0] == 0  # an earlier export: replaced
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == first
    assert not list(tmp_path.glob(".tmp_*"))  # no staging directory left behind
