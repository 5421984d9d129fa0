"""Resources the worker hosts for its tasks, next to the task slots.

* :mod:`.gpu`: GPU inventory and GPU-aware slots (``CUDA_VISIBLE_DEVICES`` per task).
* :mod:`.costs`: per-task cost accounting and daily budgets.
* :mod:`.ray_host`: a persistent local Ray head, or an existing cluster passed on to tasks.
* :mod:`.model_host`: the runners' model service, so models stay loaded across tasks.
"""
