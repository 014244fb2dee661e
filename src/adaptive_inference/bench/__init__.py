"""The benchmark as a matrix of jobs: one job per (backend, configuration), each paired with the baseline in
its own process (job.py), plus one library-reference job per backend (reference.py). The report collects
whatever jobs exist."""
