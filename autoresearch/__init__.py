"""autoresearch's driver: the overnight loop around train.py, one concern per module.

cli (flags, checks, start/resume) -> loop (propose -> run -> decide -> record, as a pipeline)
-> experiment (an experiment's course), proposals (ideas and fixes from the LLM), llm and
openai_api (the APIs), prompt (what the model sees), notebook (the research memory), edits
(the edit tool), slots (one training slot per GPU, in its own worktree), cluster (Ray),
training (one run of train.py), sandbox (bubblewrap), decisions (the keep rule), records
(journal, results.tsv, git); report reads the records.
"""
