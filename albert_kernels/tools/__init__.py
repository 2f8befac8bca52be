"""What the ``albert-kernels`` commands run (the command line itself is ``albert_kernels/cli.py``):
the error budget (budget.py) and the verification cases (cases.py) behind ``verify`` (verify.py),
the benchmark workloads (workloads.py, model_workloads.py) and peak-memory probe (memory.py)
behind ``bench`` (bench.py), and ``info`` (info.py)."""
