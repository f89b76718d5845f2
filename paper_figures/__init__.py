"""The paper's figures and results table, rebuilt from the committed run logs in one command.

    python -m paper_figures [--runs paper_figures/runs.json] [--out paper_figures/out]
                            [--readme README.md | --no-readme]

``runs.json`` names the comparisons, each a set of `experiments.pretrain` run directories (paths
relative to the repository root)::

    {"cpu": {"adamw": "results/cpu_adamw", "galore": "results/cpu_galore", ...}}

For each comparison ``<name>``, ``<out>/<name>/`` receives one PNG per figure module:

- `fig_rank_trajectories`: the gradient's energy rank and the optimizer's chosen rank by layer type,
- `fig_spectra`: singular-value spectra over training of a q_proj and a down_proj,
- `fig_perplexity`: validation perplexity against step and tokens, training loss beside it,
- `fig_memory`: optimizer-state memory, peak memory and tokens/s, with ratios to AdamW;

and ``<out>/results.md`` the comparison table (`experiments.compare.comparison_table`) with the
ratios to AdamW. With ``--readme`` (the default) the same table and links to the figures replace
the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` in the README.

Every number comes from the logs; a missing run directory or log stops the command with a
one-line error naming the file. Nothing random is drawn and the PNGs carry no metadata, so the
same logs give the same bytes. Each figure module also runs alone:
``python -m paper_figures.fig_memory [--runs ...] [--out ...]``.
"""
