"""CPU kernels: what a matmul can be on a CPU (kernels.py), the layers that use them (layers.py), which a model gets on
this CPU and the swap that gives them (choice.py), and measuring instead of the rule (tune.py)."""
