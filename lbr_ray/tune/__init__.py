"""Ray Tune sweeps over the compression ratio R (or k) and the temperature: `lbr tune`.

space.py (search space, per-trial configs, stage-1 key; no Ray), stage1.py (shared stage-1 cache), search.py
(Tuner, trial driver, resume), analysis.py + plots.py (table, plots, best config, test eval of the best trial).
study.py: `lbr study`, a variant x seed grid on the same machinery (TREC runs, mean +- std, ranx significance).
"""
