"""
Evaluation of trained checkpoints: zero-shot benchmarks through lm-evaluation-harness, length extrapolation,
passkey retrieval. See eval/README.md for the commands.

    python -m eval.zero_shot --checkpoint out/medium_rope              # the paper's 7 tasks, 0-shot
    python -m eval.lm_eval --model grape --model_args checkpoint=... --tasks ...   # lm-eval's own CLI
    python -m eval.extrapolation --checkpoint A B --lengths 1x,2x,4x    # loss vs position beyond block_size
    python -m eval.passkey --checkpoint A                                # passkey retrieval accuracy

The modules import the repository's top-level `model`, `config` and `checkpoint`; the repository root is put on
sys.path here so that the package also works when imported from another working directory.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
