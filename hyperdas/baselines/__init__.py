"""RAVEL's baselines on the same data and metric as HyperDAS: DAS and MDAS at the last entity token (pyvene).

- ``das``: the interchange through pyvene's LowRankRotatedSpaceIntervention, and the full-vector ceiling.
- ``sweep``: a layer sweep trained from cached target states (``run_sweep``, ``BaselineConfig``).
"""

from hyperdas.baselines.das import LastEntityDAS, full_vector_patch, patched_label_logits
from hyperdas.baselines.sweep import METHODS, BaselineConfig, run_sweep

__all__ = ["METHODS", "BaselineConfig", "LastEntityDAS", "full_vector_patch", "patched_label_logits", "run_sweep"]
