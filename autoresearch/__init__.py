"""autoresearch's driver: the overnight loop around train.py, one concern per module.

cli (flags, checks, start/resume) -> loop (propose -> run -> decide -> record) -> llm (the API),
prompt (what the model sees), edits (the edit tool), training (one run of train.py),
decisions (the keep rule), records (journal, results.tsv, git); report reads the records.
"""
