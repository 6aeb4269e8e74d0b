"""Studies: a notebook study's protocol as one command (spec: the file, run: the runs, report: the parent's report)."""
