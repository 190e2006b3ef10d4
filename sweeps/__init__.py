"""
Sweeps: a TOML spec expanded into named training runs, launched on SLURM or one after another on this machine,
each followed by its evaluations.

    spec.py    read and validate a spec (configs/sweeps/*.toml), expand its grid into Runs with resolved configs
    state.py   what a run directory holds (new, unfinished, trained, evaluated); a CLI the batch scripts call
    slurm.py   one batch script per run; submission with sbatch
    local.py   run train.py and the evaluations as subprocesses here, skipping what is done

The command line is scripts/sweep.py; scripts/report.py turns the run directories into tables and plots.
"""
