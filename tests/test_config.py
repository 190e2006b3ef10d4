"""config.py: TOML files and their errors, the shipped configs, the one value parser behind every command line
(train.py --key=value, eval --override key=value, sweeps --set key=value), the run-level rules (total_steps,
resume compatibility); and device.py, which turns the device and dtype settings into a torch device and an autocast
context."""

import contextlib

import pytest
import torch

import train
from config import (ConfigError, check_resume_config, load_config, parse_override, parse_setting, parse_value,
                    total_steps)
from device import DeviceError, autocast_context, resolve_device
from eval.load import CheckpointError, model_overrides
from helpers import REPO
from sweeps.spec import SpecError, parse_setting as sweep_setting

TINY = REPO / "configs" / "tiny" / "rope.toml"


# ------------------------------------------------------------------------------------------------------ config files


def test_bad_configs_give_named_errors(tmp_path, capsys):
    base = [str(TINY), f"--out_dir={tmp_path / 'run'}", "--device=cpu"]
    for extra, expected in [(["--pos_encodng=rope"], "unknown key 'pos_encodng'; did you mean 'pos_encoding'"),
                            (["--max_steps=ten"], "key 'max_steps' must be int"),
                            (["--pos_encoding=rotary"], "unknown GPTConfig.pos_encoding 'rotary'"),
                            (["--wandb=yes"], "key 'wandb' must be one of")]:
        assert train.main(base + extra) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "missing.toml"\n')
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(bad)
    bad.write_text('lr = 0.1\n')
    with pytest.raises(ConfigError, match=f"{bad}: unknown key 'lr'"):
        load_config(bad)
    bad.write_text('n_layer = "two"\n')
    with pytest.raises(ConfigError, match="key 'n_layer' must be int"):
        load_config(bad)


PAPER_PES = ["rope", "alibi", "fox", "grape_m", "grape_m_ctx", "grape_a_q", "grape_a_k", "grape_a_qk", "grape_ap"]


def test_every_shipped_config_loads_and_the_paper_grid_is_exact():
    """configs/medium and configs/large are the official repo's 30 runs: PE x {without, with} KV-shift, GRAPE-A at
    medium only, each with the paper's size and the reference recipe; configs/extra and configs/tiny load too."""
    grid = {}
    for folder in ("base", "medium", "large", "extra", "tiny"):
        for path in sorted((REPO / "configs" / folder).glob("*.toml")):
            cfg = load_config(path)
            if folder in ("medium", "large", "extra"):
                assert (cfg.global_batch_size, cfg.model.block_size, cfg.max_steps, cfg.learning_rate, cfg.min_lr,
                        cfg.warmup_steps, cfg.lr_decay_steps, cfg.weight_decay, cfg.grad_clip) == \
                       (480, 4096, 25000, 1e-3, 3e-5, 2000, 25000, 0.01, 1.0), path
                size = (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.head_dim)
                assert size == {"medium": (24, 8, 1024, 128), "large": (36, 10, 1280, 128)}[
                    folder if folder != "extra" else path.name.split("_")[0]], path
            if folder in ("medium", "large"):
                grid[folder, cfg.model.pos_encoding, cfg.model.kv_shift] = path.stem
    expected = {(size, pe, kv): pe + ("_kvshift" if kv else "") for size in ("medium", "large") for pe in PAPER_PES
                for kv in (False, True) if size == "medium" or not pe.startswith("grape_a_")}
    assert grid == expected
    tiny = {load_config(p).model.pos_encoding for p in (REPO / "configs" / "tiny").glob("*.toml")}
    assert {"nope", "pope", "rope_id", "grape_m_rank2", "grape_m_basis", "grape_m_mix", *PAPER_PES} <= tiny


# ------------------------------------------------------------------------------------------------- the value parser


@pytest.mark.parametrize("key, text, value", [
    ("max_steps", "480", 480), ("max_steps", "1e5", 100000), ("max_steps", "480.0", 480), ("max_steps", "1_000", 1000),
    ("max_steps", "0x10", 16), ("max_steps", "+5", 5), ("max_steps", " 7 ", 7), ("max_steps", "007", 7),
    ("learning_rate", "3e-4", 3e-4), ("learning_rate", "1", 1.0), ("learning_rate", "0x10", 16.0),
    ("rope_base", "inf", float("inf")),
    ("kv_shift", "true", True), ("kv_shift", "YES", True), ("kv_shift", "1", True), ("kv_shift", "False", False),
    ("kv_shift", "no", False), ("kv_shift", "0", False),
    ("grape_a_gate_init_std", "none", None), ("grape_a_gate_init_std", "Null", None),
    ("grape_a_gate_init_std", "0.1", 0.1),
    ("pos_encoding", "alibi", "alibi"), ("pos_encoding", '"alibi"', "alibi"), ("pos_encoding", "'alibi'", "alibi"),
    ("data_dir", "/scratch/shards", "/scratch/shards"), ("data_dir", '" a b "', " a b "), ("data_dir", "1", "1"),
    ("wandb_run_name", "true", "true"), ("rope_scaling", "none", "none"), ("wandb", "offline", "offline"),
])
def test_parse_value_readings(key, text, value):
    got = parse_value(key, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize("key, text, value", [
    ("n_layer", "12", 12), ("n_layer", "1e1", 10), ("rope_base", "500000", 500000.0), ("rope_base", "5e5", 500000.0),
    ("kv_shift", "true", True), ("qk_norm", "no", False), ("pos_encoding", "grape_ap", "grape_ap"),
    ("pos_encoding", '"fox"', "fox"), ("rope_scaling", "yarn", "yarn"), ("grape_a_gate_init_std", "none", None),
])
def test_the_same_text_gives_the_same_value_through_every_channel(key, text, value):
    """train.py --key=value, eval --override key=value (and lm-eval's model_args), sweeps --set key=value."""
    through_train = getattr(load_config(TINY, [f"--{key}={text}"]).model, key)
    through_eval = model_overrides([f"{key}={text}"])[key]
    through_model_args = model_overrides({key: text})[key]
    through_sweep = sweep_setting(f"{key}={text}")[1]
    for got in (through_train, through_eval, through_model_args, through_sweep):
        assert got == value and type(got) is type(value), (got, value)


def test_errors_name_the_key_the_value_and_the_expected_type_in_every_channel():
    with pytest.raises(ConfigError, match=r"override '--n_layer=ten': key 'n_layer' must be int, got 'ten'"):
        load_config(TINY, ["--n_layer=ten"])
    with pytest.raises(CheckpointError, match=r"config override 'n_layer=ten': key 'n_layer' must be int, got 'ten'"):
        model_overrides(["n_layer=ten"])
    with pytest.raises(SpecError, match=r"--set 'n_layer=ten': key 'n_layer' must be int, got 'ten'"):
        sweep_setting("n_layer=ten")
    with pytest.raises(SpecError, match=r"--set 'kv_shift=maybe': key 'kv_shift' must be bool, got 'maybe'"):
        sweep_setting("kv_shift=maybe")
    with pytest.raises(ConfigError, match=r"key 'wandb' must be one of \('disabled', 'offline', 'online'\), got 'x'"):
        parse_value("wandb", "x")
    with pytest.raises(ConfigError, match="unknown key 'n_layers'; did you mean 'n_layer'"):
        parse_value("n_layers", "2")
    for text, syntax_error in (("n_layer", parse_setting), ("=2", parse_setting)):
        with pytest.raises(ConfigError, match="must look like key=value"):
            syntax_error(text, "--set")
    with pytest.raises(ConfigError, match="must look like --key=value"):
        parse_override("n_layer=2")


def test_setting_syntax_and_the_sweeps_own_forms():
    assert parse_setting(" rope-base = 5e5 ", "x") == ("rope_base", 500000.0)  # kebab-case key, spaces
    assert parse_override("--max-steps=10") == ("max_steps", 10)
    # a TOML list is an axis of values, as in a spec file; size and config name a base config, quoted or not
    assert sweep_setting("seed=[1, 2]") == ("seed", [1, 2])
    assert sweep_setting('pos_encoding=["rope", "alibi"]') == ("pos_encoding", ["rope", "alibi"])
    assert sweep_setting("size=tiny") == sweep_setting('size="tiny"') == ("size", "tiny")
    assert sweep_setting("config=configs/tiny/rope.toml") == ("config", "configs/tiny/rope.toml")
    with pytest.raises(SpecError, match="must look like key=value"):
        sweep_setting("seed")


# ------------------------------------------------------------------------------------------------ run-level rules


def test_total_steps_counts_the_extra_update_of_the_reference_loop():
    assert total_steps(load_config(TINY, ["--max_steps=7"])) == 7
    assert total_steps(load_config(TINY, ["--max_steps=7", "--reference_loop_quirks=true"])) == 8


def test_a_run_saved_before_a_config_key_existed_still_resumes():
    """A key missing from a saved config stands for its default (runs survive the addition of a config field); a
    real difference is still refused."""
    cfg = load_config(TINY)
    saved = cfg.resolved_dict()
    del saved["train_length"], saved["rope_scaling"]
    check_resume_config(saved, cfg, "run")
    with pytest.raises(ConfigError, match="train_length: 0 -> 256"):
        check_resume_config(saved, load_config(TINY, ["--train_length=256"]), "run")


def test_resumable_keys_may_change_and_others_may_not():
    saved = load_config(TINY).resolved_dict()
    check_resume_config(saved, load_config(TINY, ["--max_steps=800", "--device=auto", "--keep_last=5"]), "out/x")
    with pytest.raises(ConfigError, match=r"out/x holds a run with a different config \(learning_rate: 0.003 -> "
                                          r"0.01\)"):
        check_resume_config(saved, load_config(TINY, ["--learning_rate=1e-2"]), "out/x")


# ------------------------------------------------------------------------------------------- device and precision


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeviceError, match="device 'cuda:1' requested but CUDA is not available"):
        resolve_device("cuda:1")
    with pytest.raises(DeviceError, match="device 'gpu0' is not a torch device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:2") == torch.device("cuda", 2)
    assert resolve_device("cuda:2", local_rank=5) == resolve_device("auto", local_rank=5) == torch.device("cuda", 5)


def test_autocast_context():
    cpu = torch.device("cpu")
    for dtype in ("float32", "auto"):  # auto is float32 off CUDA
        assert isinstance(autocast_context(cpu, dtype), contextlib.nullcontext)
    amp = autocast_context("cpu", "bfloat16")
    for _ in range(2):  # one context serves a whole run
        with amp:
            assert torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(DeviceError, match="dtype must be one of auto, bfloat16, float32, got 'fp16'"):
        autocast_context(cpu, "fp16")
