"""
lm-evaluation-harness's own command line with this repository's model registered as "grape".

lm-eval discovers models only through its registry, which a module fills when it is imported; its CLI has no plugin
mechanism. This module imports eval.lm (registering "grape") and hands every argument to lm-eval's CLI unchanged:

    python -m eval.lm_eval --model grape --model_args checkpoint=out/medium_rope,batch_size=32 \\
        --tasks arc_easy,piqa --device cuda --output_path results/
    python -m eval.lm_eval run --model grape --model_args checkpoint=out/tiny_rope --tasks paper7_local \\
        --include_path eval/data/tasks --limit 20          # local data: see `python -m eval.tasks`

Two defaults differ from calling lm-eval directly: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 are set unless already
set (export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to let lm-eval download task data), and when --device is not given
the device is cuda if available, else cpu (lm-eval's own default, cuda:0, fails on CPU-only machines).
"""

import sys

from eval.load import set_offline_defaults


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    set_offline_defaults()
    import torch

    import eval.lm  # noqa: F401  (registers "grape")
    from lm_eval.__main__ import cli_evaluate

    if "--model" in argv or any(a.startswith("--model=") for a in argv):
        if not any(a == "--device" or a.startswith("--device=") for a in argv):
            argv += ["--device", "cuda" if torch.cuda.is_available() else "cpu"]
    sys.argv = [sys.argv[0]] + argv
    cli_evaluate()


if __name__ == "__main__":
    main()
