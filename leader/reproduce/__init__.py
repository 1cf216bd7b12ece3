"""`leader reproduce PIPELINE.yaml --out DIR`: a whole study, from raw datasets to report, as resumable steps.

- spec.py         the pipeline file: its schema, profiles and validation -> Pipeline
- steps.py        a Pipeline expanded into Steps: `leader ...` argument lists with inputs and outputs
- fingerprints.py what a step's result depends on (arguments, input identities, upstream steps)
                  and the markers that record a finished step
- runner.py       missing-input check, selection (--only), skipping, running, resuming
- paper_report.py the report step: `leader report`'s sections plus the tables and figures the
                  pipeline file lays out, with "not run" cells for what was skipped
- commands.py     the typer command
"""
