"""The reference workload of ``bench_simulate.py`` written as a careful user would,
in plain NumPy (:mod:`numpy_peer`) and in PyTorch CPU (:mod:`torch_peer`)."""
