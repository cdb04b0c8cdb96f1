"""dfad-edge: data-free adversarial distillation for edge deployment.

The pipeline is laid out as packages: ``distill`` -> ``export`` -> ``bench``,
with ``models``, ``data`` and ``checkpoint`` beside them and a thin CLI on top.
"""

__version__ = "0.1.0"
