"""The generate job: preflight, read, validate, expand, generate, score, write, commit, finalize (`job.run_job`)."""
