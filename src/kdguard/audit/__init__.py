"""Auditing a teacher before distilling it: is some class reachable by an abnormally small
universal trigger (Neural Cleanse, Wang et al., S&P 2019)?

* :mod:`.reachability`: per-class mask/pattern trigger search, and an additive L∞ form.
* :mod:`.anomaly`: the median-absolute-deviation anomaly index over the per-class sizes.
"""

from .anomaly import anomaly_index, flagged_classes
from .reachability import (AdditiveSearch, AdditiveTrigger, ClassTrigger, TriggerSearch,
                           additive_trigger, reverse_all, reverse_trigger)

__all__ = ["AdditiveSearch", "AdditiveTrigger", "ClassTrigger", "TriggerSearch", "additive_trigger",
           "anomaly_index", "flagged_classes", "reverse_all", "reverse_trigger"]
