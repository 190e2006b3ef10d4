"""
Evaluation of trained checkpoints: zero-shot benchmarks through lm-evaluation-harness, length extrapolation,
passkey retrieval. See eval/README.md for the commands, run from the repository root:

    python -m eval.zero_shot --checkpoint out/medium_rope              # the paper's 7 tasks, 0-shot
    python -m eval.lm_eval --model grape --model_args checkpoint=... --tasks ...   # lm-eval's own CLI
    python -m eval.extrapolation --checkpoint A B --lengths 1x,2x,4x    # loss vs position beyond block_size
    python -m eval.passkey --checkpoint A                                # passkey retrieval accuracy

The modules import the repository's top-level modules (`model`, `config`, `checkpoint`, `device`), which
`python -m` finds because it puts the working directory, the repository root, first on sys.path.

    load.py     checkpoint -> ready model, config, device, precision context (the one route; checkpoint.py reads)
    command.py  what the commands share: model flags, labels, output names, the error-handling tail
    scoring.py  per-token losses without (B, T, vocab) logits
    lm.py       the lm-eval model "grape"; lm_eval.py runs lm-eval's CLI with it registered
    tasks.py    the 7 zero-shot tasks' offline data and lm-eval task YAMLs
"""
