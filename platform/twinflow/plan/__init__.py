"""`twinflow plan`: will a job fit its GPUs, and what is the cheapest layout that does?

The model is built on the meta device (no weights, no memory), so the 20B Qwen-Image config plans
in seconds on a laptop. Model states follow DeepSpeed's own accounting (cross-checked against its
estimators in the tests); activations come from a per-layer per-token formula fitted to
measurements of small configs on the CPU (`activations.py`); TwinFlow's no-grad passes and its
teacher/EMA averages come from the job's method and train sections (`memory.py`).
"""
