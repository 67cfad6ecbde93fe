"""Experiment grids (dataset x initialisation x label budget x seed) and their reports.

    grid_schema.py   the experiment file schema and its expansion into shared jobs + cells
    shared_jobs.py   the shared jobs: pretrainings and supervised source fine-tunings
    grid.py          the runner: skips finished cells, records failed ones, resumes interrupted ones
    cost.py          the --dry-run estimate (FLOPs per image x images, at a share of the matmul peak)
    report.py        tables (Markdown, CSV) and figures (label efficiency, per landmark)
    wandb_report.py  the report as a W&B summary run in the grid's group
"""
